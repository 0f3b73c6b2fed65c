"""`nemovl-build engines` end to end on the tiny checkpoint: cpu target (ONNX checked, bundle, manifest, skipping)
and a GPU target on this GPU-less machine (clear one-line failure after the ONNX is produced and checked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from nemovl_trt.build.manifest import load_manifest, sha256_file
from nemovl_trt.cli import build_cli


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_is_complete(cpu_engines_dir: Path, tiny_ckpt_dir: Path):
    m = load_manifest(cpu_engines_dir)  # checks keys and that every path exists
    assert m["model_id"] == "nvidia/nemotron-nano-12b-v2-vl"
    assert m["target"]["name"] == "cpu" and m["target"]["gpu"] is False
    assert m["paths"] == {"vision_onnx": "vision/model.onnx", "vision_plan": None, "onnx_check": "vision/onnx_check.json",
                          "llm_dir": "llm", "llm_api_options": None, "tokenizer_dir": "tokenizer"}
    assert m["precisions"] == {"llm": "fp32", "vision": "fp32", "kv_cache": "fp32", "mamba_ssm_cache": "float32"}
    assert m["limits"] == {"max_batch_size": 8, "max_batch_size_fit": m["plan"]["max_batch_size"],
                           "max_batch_size_configured": 8, "max_num_tokens": 8192, "max_seq_len": 8192,
                           "max_num_tiles": 12, "max_images": 4, "max_video_frames": 128,
                           "vision_max_batch_tiles": 52}
    cfg = json.loads((tiny_ckpt_dir / "config.json").read_text())
    hidden = cfg["llm_config"]["hidden_size"]
    assert m["vision"]["output_shape"] == [-1, 256, hidden] and m["vision"]["input_shape"] == [-1, 3, 512, 512]
    assert m["llm"]["engine"] == "reference" and m["model"]["video_pruning_rate"] == cfg["video_pruning_rate"]
    assert m["onnx_check"]["passed"] is True and m["onnx_check"]["batch_sizes"] == [1, 3]
    assert 0 <= m["onnx_check"]["max_abs_error"] <= 1e-4
    assert torch.__version__.startswith(m["tool_versions"]["torch"])
    assert m["tool_versions"]["onnxruntime"] and m["tool_versions"]["tensorrt"] is None
    for key in ("weights_bytes", "mamba_state_bytes_per_seq", "kv_bytes_per_token", "activation_bytes",
                "max_batch_size", "decode_tokens_per_s_bound"):
        assert key in m["plan"]
    # hashes: every input is a checkpoint file, every output is a file of the engines dir with that content
    assert set(m["inputs"]) == {p.name for p in tiny_ckpt_dir.iterdir() if p.is_file()}
    for name, digest in m["inputs"].items():
        assert sha256_file(tiny_ckpt_dir / name) == digest
    assert {"vision/model.onnx", "vision/onnx_check.json", "llm/model.safetensors", "llm/config.json",
            "tokenizer/tokenizer.json"} <= set(m["outputs"])
    for rel, digest in m["outputs"].items():
        assert sha256_file(cpu_engines_dir / rel) == digest
    # llm/ is the checkpoint, byte for byte
    for p in tiny_ckpt_dir.iterdir():
        if p.is_file():
            assert (cpu_engines_dir / "llm" / p.name).read_bytes() == p.read_bytes()


def test_onnx_matches_pytorch_independently(cpu_engines_dir: Path, tiny_ckpt_dir: Path):
    import onnx
    import onnxruntime as ort

    from nemovl_trt.build.onnx_export import load_vision_encoder

    path = cpu_engines_dir / "vision" / "model.onnx"
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "num_tiles" and [d.dim_value for d in dims[1:]] == [3, 512, 512]
    # the position embedding is folded: no Resize (interpolation) and no full CPE grid initializer
    assert "Resize" not in {n.op_type for n in model.graph.node}
    cfg, enc = load_vision_encoder(tiny_ckpt_dir)
    grid = cfg.vision.pos_grid**2
    assert not any(len(i.dims) == 3 and i.dims[1] == grid for i in model.graph.initializer)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tiles = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = enc(tiles).numpy()
    got = sess.run(None, {"pixel_values": tiles.numpy()})[0]
    assert got.shape == (2, cfg.tokens_per_tile, cfg.llm.hidden_size)
    assert np.max(np.abs(got - ref)) <= 1e-4


def test_second_run_skips_everything_and_a_touched_output_rebuilds_only_its_step(cpu_engines_dir, tiny_ckpt_dir,
                                                                                 tmp_path):
    out = tmp_path / "eng"
    shutil.copytree(cpu_engines_dir, out)  # copy2 keeps mtimes, so the copy is up to date
    before = _files(out)
    args = ["engines", "--target", "cpu", "--checkpoint", str(tiny_ckpt_dir), "--out", str(out)]
    r = CliRunner().invoke(build_cli, args)
    assert r.exit_code == 0, r.output
    for step in ("vision_onnx", "vision_check", "llm_weights", "tokenizer", "manifest"):
        assert f"[{step}] up to date, skipped" in r.output
    assert "all steps up to date" in r.output and "max abs error" in r.output
    after = _files(out)
    assert {k: v for k, v in after.items() if k != ".build_state.json"} == \
        {k: v for k, v in before.items() if k != ".build_state.json"}

    def manifest_body() -> dict:
        return {k: v for k, v in json.loads((out / "manifest.json").read_text()).items() if k != "build_seconds"}

    manifest = manifest_body()
    (out / "tokenizer" / "tokenizer.json").unlink()
    r = CliRunner().invoke(build_cli, args)
    assert r.exit_code == 0, r.output
    assert "[tokenizer] built" in r.output and "[vision_onnx] up to date, skipped" in r.output
    assert "[vision_check] up to date, skipped" in r.output and "[llm_weights] up to date, skipped" in r.output
    assert manifest_body() == manifest  # same bytes again → same hashes, same manifest
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (tiny_ckpt_dir / "tokenizer.json").read_bytes()

    r = CliRunner().invoke(build_cli, [*args, "--force"])
    assert r.exit_code == 0 and "skipped" not in r.output and "[vision_onnx] built" in r.output


@pytest.fixture(scope="module")
def h100_run(tiny_ckpt_dir, tmp_path_factory):
    """`engines --target h100` on this GPU-less machine: (output dir, CliRunner result)."""
    out = tmp_path_factory.mktemp("h100") / "h100"
    r = CliRunner().invoke(build_cli, ["engines", "--target", "h100", "--checkpoint", str(tiny_ckpt_dir),
                                       "--out", str(out)])
    return out, r


def test_gpu_target_fails_cleanly_after_checking_the_onnx(h100_run):
    out, r = h100_run
    assert r.exit_code == 1
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert errors == ["Error: target h100 needs an NVIDIA GPU (sm90) and TensorRT; none found"]
    # the ONNX was produced in fp16 and checked against PyTorch within the h100 tolerance
    check = json.loads((out / "vision" / "onnx_check.json").read_text())
    assert check["passed"] is True and check["max_abs_error"] <= 0.05
    import onnx

    model = onnx.load(str(out / "vision" / "model.onnx"))
    assert {i.data_type for i in model.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.FLOAT16}
    # no manifest and no plan; the LLM-API options from the plan are there
    assert not (out / "manifest.json").exists() and not (out / "vision" / "model.plan").exists()
    opts = yaml.safe_load((out / "llm" / "llm_api_options.yaml").read_text())
    assert opts["max_batch_size"] == 128 and opts["max_seq_len"] == 8192 and opts["max_num_tokens"] == 8192
    assert opts["kv_cache_config"] == {"free_gpu_memory_fraction": 0.9, "enable_block_reuse": False,
                                       "mamba_ssm_cache_dtype": "float32", "dtype": "fp8"}
    assert opts["cuda_graph_config"]["batch_sizes"] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert opts["enable_chunked_prefill"] is True


def test_quantized_checkpoint_validation(tiny_ckpt_dir, tmp_path):
    """An FP8 ModelOpt-style checkpoint is accepted when every decoder Linear has F8 weights and fp32 scales."""
    from safetensors.torch import load_file, save_file

    from nemovl_trt.build.trtllm_bundle import BundleError, quantized_linears, validate_quantized_checkpoint
    from nemovl_trt.checkpoint.config import load_vlm_config

    q = tmp_path / "fp8"
    shutil.copytree(tiny_ckpt_dir, q)
    cfg = load_vlm_config(q)
    tensors = load_file(str(q / "model.safetensors"))
    for name, _, _ in quantized_linears(cfg, []):
        w = tensors[f"{name}.weight"]
        scale = w.abs().max() / 448.0
        tensors[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale"] = scale.reshape(()).float()
        tensors[f"{name}.input_scale"] = torch.tensor(1.0)
    save_file(tensors, str(q / "model.safetensors"))
    conf = json.loads((q / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                   "exclude_modules": ["lm_head", "vision_model*", "mlp1*"]}
    (q / "config.json").write_text(json.dumps(conf))
    info = validate_quantized_checkpoint(q, cfg, "fp8")
    n = len(quantized_linears(cfg, []))
    assert info == {"source": "pre-quantized", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                    "quantized_linears": n}
    with pytest.raises(BundleError, match=r"is quantized with FP8, but the target needs NVFP4"):
        validate_quantized_checkpoint(q, cfg, "nvfp4")
    victim = quantized_linears(cfg, [])[0][0]
    del tensors[f"{victim}.weight_scale"]
    save_file(tensors, str(q / "model.safetensors"))
    with pytest.raises(BundleError, match=rf"missing the FP8 tensor '{victim}.weight_scale'"):
        validate_quantized_checkpoint(q, cfg, "fp8")
    with pytest.raises(BundleError, match=r"is not quantized"):
        validate_quantized_checkpoint(tiny_ckpt_dir, cfg, "fp8")


def test_bf16_gpu_target_converts_the_llm_weights(tiny_ckpt_dir, tmp_path, h100_run):
    """a100 (bf16): the fp32 tiny checkpoint becomes a BF16 bundle on CPU; only the TensorRT step needs a GPU."""
    from safetensors import safe_open

    out = tmp_path / "a100"
    # same vision precision/opset/tolerance as h100: its ONNX steps are up to date and get reused
    shutil.copytree(h100_run[0], out)
    r = CliRunner().invoke(build_cli, ["engines", "--target", "a100", "--checkpoint", str(tiny_ckpt_dir),
                                       "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: target a100 needs an NVIDIA GPU (sm80) and TensorRT; none found" in r.output
    assert "[llm_weights] built" in r.output and "[vision_onnx] up to date, skipped" in r.output
    with safe_open(str(out / "llm" / "model.safetensors"), framework="pt") as f, \
            safe_open(str(tiny_ckpt_dir / "model.safetensors"), framework="pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():  # noqa: SIM118
            a, b = f.get_tensor(k), g.get_tensor(k)
            if b.dtype.is_floating_point:
                assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))
            else:
                assert torch.equal(a, b)
    assert json.loads((out / "llm" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    opts = yaml.safe_load((out / "llm" / "llm_api_options.yaml").read_text())
    assert opts["kv_cache_config"]["dtype"] == "auto" and opts["max_batch_size"] == 64
    _assert_bundle_loadable(out / "llm", tiny_ckpt_dir, opts)


def _assert_bundle_loadable(bundle: Path, ckpt: Path, opts: dict) -> None:
    """What LLM(model=bundle, trust_remote_code=True) needs (docs/trtllm.md §5), checked with the real
    transformers AutoConfig, the loader TensorRT-LLM itself calls."""
    from transformers import AutoConfig

    from nemovl_trt.build.bundle_contents import check_bundle

    names = {p.name for p in bundle.iterdir()}
    assert {"config.json", "configuration_nemovl_vl.py", "preprocessor_config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "model.safetensors", "llm_api_options.yaml"} <= names
    conf = json.loads((bundle / "config.json").read_text())
    assert conf["auto_map"] == {"AutoConfig": "configuration_nemovl_vl.NemovlNanoVLConfig"}
    assert "auto_map" not in json.loads((ckpt / "config.json").read_text())  # the checkpoint is untouched
    assert opts["trust_remote_code"] is True
    check_bundle(bundle, opts)
    hf = AutoConfig.from_pretrained(str(bundle), trust_remote_code=True)
    assert hf.architectures == ["NemotronH_Nano_VL_V2"] and hf.img_context_token_id == 1500
    assert type(hf.llm_config).__name__ == "NemotronHConfig"
    assert (hf.llm_config.hidden_size, hf.llm_config.hybrid_override_pattern) == (128, "M-M*-M*-")
    assert hf.vision_config.args["model"] == conf["vision_config"]["args"]["model"]
    with pytest.raises(ValueError):  # without trust_remote_code transformers refuses, as upstream would
        AutoConfig.from_pretrained(str(bundle), trust_remote_code=False)


def test_onnx_error_over_the_target_tolerance_fails_the_build(cpu_engines_dir, tiny_ckpt_dir, tmp_path):
    from nemovl_trt.build.targets import BUILD_CONFIGS_DIR

    data = yaml.safe_load((BUILD_CONFIGS_DIR / "cpu.yaml").read_text())
    data["vision"]["max_abs_error"] = 1e-12
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(data))
    out = tmp_path / "eng"
    shutil.copytree(cpu_engines_dir, out)
    r = CliRunner().invoke(build_cli, ["engines", "--target", str(strict), "--checkpoint", str(tiny_ckpt_dir),
                                       "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "[vision_onnx] up to date, skipped" in r.output  # same graph; only the check's options changed
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "the vision ONNX graph differs from PyTorch by" in errors[0]
    assert "tolerance vision.max_abs_error = 1.0e-12" in errors[0]
    assert not (out / "manifest.json").exists()  # a failed build leaves no manifest behind


def test_nvfp4_checkpoint_validation_checks_packing_and_block_scales(tiny_ckpt_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from nemovl_trt.build.trtllm_bundle import BundleError, quantized_linears, validate_quantized_checkpoint
    from nemovl_trt.checkpoint.config import load_vlm_config

    q = tmp_path / "nvfp4"
    shutil.copytree(tiny_ckpt_dir, q)
    cfg = load_vlm_config(q)
    tensors = load_file(str(q / "model.safetensors"))
    linears = quantized_linears(cfg, ["*layers.0.*"])  # layer 0 excluded: stays 16/32-bit
    assert all(".layers.0." not in name for name, _, _ in linears)
    for name, out_f, in_f in linears:
        tensors[f"{name}.weight"] = torch.zeros(out_f, in_f // 2, dtype=torch.uint8)
        tensors[f"{name}.weight_scale"] = torch.ones(out_f, in_f // 16).to(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale_2"] = torch.tensor(1.0)
        tensors[f"{name}.input_scale"] = torch.tensor(1.0)
    save_file(tensors, str(q / "model.safetensors"))
    (q / "hf_quant_config.json").write_text(json.dumps(
        {"quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "exclude_modules": ["*layers.0.*"]}}))
    info = validate_quantized_checkpoint(q, cfg, "nvfp4")
    assert info["quant_algo"] == "NVFP4" and info["quantized_linears"] == len(linears)
    name, out_f, in_f = linears[0]
    tensors[f"{name}.weight_scale"] = torch.ones(out_f, in_f // 16)  # fp32 block scales: wrong dtype
    save_file(tensors, str(q / "model.safetensors"))
    with pytest.raises(BundleError, match=rf"'{name}.weight_scale' is F32 \[{out_f}, {in_f // 16}\], expected F8_E4M3"):
        validate_quantized_checkpoint(q, cfg, "nvfp4")


def test_load_manifest_rejects_a_dir_missing_a_named_file(cpu_engines_dir, tmp_path):
    from nemovl_trt.build.manifest import ManifestError

    out = tmp_path / "eng"
    shutil.copytree(cpu_engines_dir, out)
    (out / "vision" / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"names vision_onnx 'vision/model.onnx', which does not exist"):
        load_manifest(out)
    with pytest.raises(ManifestError, match=r"does not exist; run `nemovl-build engines` first"):
        load_manifest(tmp_path)
