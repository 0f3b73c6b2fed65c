"""Multi-GPU plan and build (issue 16 part 1): per-GPU memory plan of the real 12B config at tp 1/2/4/8 against
hand arithmetic, pipeline stages, invalid layouts refused in one line, the `parallel:` / `serving:` /
`tensor_tflops:` YAML keys, llm_api_options.yaml and the manifest's world size, the preprocessing-cores line,
and the docs/deploy.md plan table equal to the generated one."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nemovl_trt.build.plan import (
    PlanError,
    check_parallel,
    deploy_table,
    format_plan,
    plan_memory,
    stage_layers,
)
from nemovl_trt.build.targets import BUILD_CONFIGS_DIR, TargetError, load_target
from nemovl_trt.checkpoint.config import parse_vlm_config
from nemovl_trt.checkpoint.presets import preset_config
from nemovl_trt.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# --- the published 12B config (docs/model.md §1): h 5120, vocab 131200, I 20480, 40 heads / 8 KV heads of 128,
# 128 Mamba heads of 80, state 128, 8 groups, conv kernel 4, chunk 128; 28 M, 6 *, 28 - layers --------------
H, V, I_MLP, HD = 5120, 131200, 20480, 128
D_INNER = 128 * 80  # 10240
CONV_DIM = D_INNER + 2 * 8 * 128  # 12288
IN_PROJ = 2 * D_INNER + 2 * 8 * 128 + 128  # 22656
N_M, N_A, N_L = 28, 6, 28
PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
VISION_PARAMS = 861_363_200  # RADIO + mlp1 (worked out in tests/test_build_plan.py)
N_LINEARS = N_M * 2 + N_A * 4 + N_L * 2  # 136 quantized Linears, each with 2 fp32 scales on every rank
LLM_LINEAR = (N_M * (H * IN_PROJ + D_INNER * H) + N_A * (2 * H * H + 2 * H * 8 * HD) + N_L * 2 * H * I_MLP)


def per_gpu_llm(tp: int, m: int = N_M, a: int = N_A, mlp: int = N_L, first: bool = True, last: bool = True):
    """(quantized Linear weights, 16-bit rest) elements one GPU holds, by hand."""
    quant = (m * (H * IN_PROJ + D_INNER * H) + a * (2 * H * H + 2 * H * 8 * HD) + mlp * 2 * H * I_MLP) // tp
    # per M layer split: conv1d weight + bias, A/D/dt_bias, gated norm; replicated: one RMSNorm per layer
    rest = m * (CONV_DIM * 4 + CONV_DIM + 3 * 128 + D_INNER) // tp + (m + a + mlp) * H
    rest += (V // tp) * H * (int(first) + int(last)) + (H if last else 0)  # vocab-parallel embedding / lm_head, norm_f
    return quant, rest


def fp8_bytes(quant: int, rest: int) -> int:
    return quant * 1 + rest * 2 + N_LINEARS * 8


@pytest.fixture(scope="module")
def cfg():
    return parse_vlm_config(preset_config("12b-config"))


def test_hand_arithmetic_is_the_whole_model_at_tp1():
    quant, rest = per_gpu_llm(1)
    assert quant == LLM_LINEAR
    assert quant + rest == 12_311_311_872  # the LLM parameter count of tests/test_build_plan.py
    assert PATTERN.count("M") == N_M and PATTERN.count("*") == N_A and PATTERN.count("-") == N_L


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_12b_per_gpu_plan_on_h100(cfg, tp):
    t = load_target("h100").with_parallel(tensor_parallel=tp)
    p = plan_memory(cfg, t)
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.world_size) == (tp, 1, tp)
    llm_w = fp8_bytes(*per_gpu_llm(tp))
    assert p.llm_weights_bytes == llm_w
    assert p.llm_weights_bytes_total == fp8_bytes(*per_gpu_llm(1))
    assert p.weights_bytes == llm_w + VISION_PARAMS * 2  # the fp16 vision engine is whole on every GPU
    mamba = N_M * (CONV_DIM // tp * 3 + 128 // tp * 80 * 128) * 4
    kv = N_A * 2 * (8 // tp) * HD * 1
    assert (p.mamba_state_bytes_per_seq, p.kv_bytes_per_token) == (mamba, kv)
    T, cap = 8192, 128
    llm_act = T * 2 * (2 * H + (IN_PROJ + CONV_DIM + D_INNER) // tp) + math.ceil(T / 128) * (128 // tp) * 80 * 128 * 4 \
        + min(T, cap) * V * 4  # logits gathered to the full vocabulary on every rank
    vis_act = (52 * 1032 * (2 * 1280 + 5120) + 52 * 256 * (5120 + 20480 + 5120)) * 2
    assert (p.llm_activation_bytes, p.vision_activation_bytes) == (llm_act, vis_act)
    budget = int(80 * GIB * 0.9)
    room = budget - llm_w - VISION_PARAMS * 2 - llm_act - vis_act
    per_seq = mamba + 131072 * kv
    assert p.kv_mamba_budget_bytes == room
    assert p.max_batch_size == room // per_seq
    b = min(room // per_seq, cap)
    assert p.engine_max_batch_size == b
    bound = b * 3350e9 / (llm_w + b * (mamba + 65536 * kv))
    assert p.decode_tokens_per_s_bound == pytest.approx(bound, abs=0.06)
    assert p.decode_tokens_per_s_bound_batch1 == pytest.approx(3350e9 / (llm_w + mamba + 65536 * kv), abs=0.06)
    # prefill roofline: tp GPUs × 1979 dense fp8 TFLOPS / (2 × decoder Linear weights) per token
    prefill = tp * 1979e12 / (2 * LLM_LINEAR)
    assert p.prefill_tokens_per_s_bound == pytest.approx(prefill, abs=0.06)
    images, frames = prefill / (13 * 256 + 2), prefill / (int(256 * (1 - 0.7)) + 2)
    assert (p.image_tokens, p.video_frame_tokens) == (3330, 78)
    assert p.preprocess_cores_images == pytest.approx(images * 0.090, abs=0.006)
    assert p.preprocess_cores_video == pytest.approx(frames * 0.023, abs=0.006)


def test_12b_tp_numbers_docs_quote(cfg):
    got = {tp: plan_memory(cfg, load_target("h100").with_parallel(tensor_parallel=tp)) for tp in (1, 2, 4, 8)}
    assert {tp: p.max_batch_size for tp, p in got.items()} == {1: 33, 2: 75, 4: 159, 8: 326}
    assert {tp: round(p.weights_bytes / 1e9, 2) for tp, p in got.items()} == {1: 15.38, 2: 8.55, 4: 5.14, 8: 3.43}
    a100 = plan_memory(cfg, load_target("a100").with_parallel(tensor_parallel=2))
    quant, rest = per_gpu_llm(2)
    assert a100.llm_weights_bytes == (quant + rest) * 2  # bf16: every parameter 2 bytes, no scales


def test_max_context_is_what_fits_for_one_sequence(cfg, tmp_path):
    small = load_target(_write(tmp_path, "h100", {"gpu_memory_gib": 20}))
    p = plan_memory(cfg, small)
    room = int(20 * GIB * 0.9) - fp8_bytes(*per_gpu_llm(1)) - VISION_PARAMS * 2 - p.activation_bytes
    assert p.kv_mamba_budget_bytes == room
    assert p.max_context_len == (room - N_M * (CONV_DIM * 3 + 128 * 80 * 128) * 4) // (N_A * 2 * 8 * HD)
    assert 0 < p.max_context_len < 131072 and p.max_batch_size == 0  # one 128K sequence does not fit
    # tp 2 halves the per-GPU weights and caches: the same GPUs hold a full-length sequence again
    assert plan_memory(cfg, small.with_parallel(tensor_parallel=2)).max_context_len == 131072
    assert "max context                 " not in format_plan(p)  # key column width is unchanged


def test_pipeline_stages_split_layers_like_tensorrt_llm(cfg):
    assert [(r.start, r.stop) for r in stage_layers(62, 4)] == [(0, 16), (16, 32), (32, 47), (47, 62)]
    assert [(r.start, r.stop) for r in stage_layers(8, 8)] == [(i, i + 1) for i in range(8)]
    p = plan_memory(cfg, load_target("h100").with_parallel(tensor_parallel=2, pipeline_parallel=2))
    assert p.world_size == 4 and len(p.stages) == 2
    s0, s1 = p.stages
    assert (s0.ranks, s1.ranks) == ((0, 1), (2, 3))  # rank = stage × tp + tp rank
    assert (s0.layer_first, s0.layer_last, s1.layer_first, s1.layer_last) == (0, 30, 31, 61)
    counts = [{k: PATTERN[a:b].count(c) for k, c in (("mamba", "M"), ("attention", "*"), ("mlp", "-"))}
              for a, b in ((0, 31), (31, 62))]
    assert [s0.num_layers_of, s1.num_layers_of] == counts
    (m0, a0, l0), (m1, a1, l1) = ([c[k] for k in ("mamba", "attention", "mlp")] for c in counts)
    assert s0.llm_weights_bytes == fp8_bytes(*per_gpu_llm(2, m0, a0, l0, first=True, last=False)) \
        - (N_LINEARS - 2 * m0 - 4 * a0 - 2 * l0) * 8
    assert s1.llm_weights_bytes == fp8_bytes(*per_gpu_llm(2, m1, a1, l1, first=False, last=True)) \
        - (N_LINEARS - 2 * m1 - 4 * a1 - 2 * l1) * 8
    assert s0.has_embedding and not s0.has_lm_head and s1.has_lm_head and not s1.has_embedding
    assert s0.mamba_state_bytes_per_seq == m0 * (CONV_DIM // 2 * 3 + 64 * 80 * 128) * 4
    assert s1.kv_bytes_per_token == a1 * 2 * 4 * HD
    # only the last stage holds the logits; the replica's batch is what fits on the tightest stage
    assert s1.llm_activation_bytes - s0.llm_activation_bytes == 128 * V * 4
    assert p.max_batch_size == min(s0.max_batch_size, s1.max_batch_size)
    assert p.decode_bytes_per_step == max(s0.decode_bytes_per_step, s1.decode_bytes_per_step)


def test_format_plan_shows_world_size_per_gpu_numbers_and_rank_layout(cfg):
    text = format_plan(plan_memory(cfg, load_target("h100").with_parallel(tensor_parallel=2, pipeline_parallel=2)))
    assert "tp 2 × pp 2 = world size 4" in text
    assert "5.14 GB per GPU" in text
    ranks = [ln for ln in text.splitlines() if "tp rank" in ln]
    assert len(ranks) == 4
    assert "rank 0: stage 0, tp rank 0: layers 0-30" in ranks[0] and "embedding (1/2 of the vocabulary)" in ranks[0]
    assert "rank 3: stage 1, tp rank 1: layers 31-61" in ranks[3] and "lm_head (1/2 of the vocabulary)" in ranks[3]
    assert all("vision engine" in ln for ln in ranks)
    one = format_plan(plan_memory(cfg, load_target("h100")))
    assert "images: 27.10/s (13 tiles = 3330 tokens) × 90 ms = 2.44 cores" in one
    assert "frames/s (78 tokens) × 23 ms" in one and "per GPU" not in one.split("prefill bound")[0]


# ---- invalid layouts: one line, exit 1, no traceback -------------------------------------------------------
def _one_line_error(r) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


@pytest.fixture(scope="module")
def ckpt_12b(tmp_path_factory):
    from nemovl_trt.checkpoint.synth import write_checkpoint

    d = tmp_path_factory.mktemp("p12b") / "12b"
    write_checkpoint(d, "12b-config")
    return d


def _config_only(tmp_path: Path, tiny_ckpt_dir: Path, **llm: object) -> Path:
    """A config-only copy of the tiny checkpoint with some llm_config keys changed (plan needs only config.json)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    data = json.loads((tiny_ckpt_dir / "config.json").read_text())
    data["llm_config"].update(llm)
    (d / "config.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize("args,message", [
    (["--tp", "3"], "target h100: --tp must be a power of two >= 1 (1, 2, 4, 8), got 3."),
    (["--tp", "0"], "target h100: --tp must be a power of two >= 1"),
    (["--pp", "-2"], "target h100: --pp must be a power of two >= 1"),
    (["--tp", "16"], "16 GPUs is more than one 8-GPU node"),
    (["--tp", "4", "--pp", "4"], "tensor_parallel × pipeline_parallel = 4 × 4 = 16 GPUs is more than one 8-GPU node"),
])
def test_plan_refuses_bad_sizes_in_one_line(ckpt_12b, args, message):
    r = CliRunner().invoke(build_cli, ["plan", "--target", "h100", "--checkpoint", str(ckpt_12b), *args])
    assert message in _one_line_error(r)


@pytest.mark.parametrize("llm,tp,message", [
    ({}, 4, "tensor_parallel 4 does not divide the checkpoint's 2 KV heads (num_key_value_heads): every rank must "
            "hold whole KV heads; sizes that fit: 1, 2."),
    ({}, 8, "tensor_parallel 8 does not divide the checkpoint's 4 attention heads (num_attention_heads)"),
    ({"num_attention_heads": 8, "num_key_value_heads": 4, "mamba_num_heads": 6}, 4,
     "does not divide the checkpoint's 6 Mamba heads (mamba_num_heads)"),
    ({"num_attention_heads": 8, "num_key_value_heads": 4, "n_groups": 2}, 4,
     "does not divide the checkpoint's 2 Mamba groups (n_groups)"),
    ({"num_attention_heads": 8, "num_key_value_heads": 4, "n_groups": 4, "intermediate_size": 250}, 4,
     "does not divide the checkpoint's 250 MLP width (intermediate_size)"),
])
def test_plan_refuses_a_tp_that_splits_a_head(tmp_path, tiny_ckpt_dir, llm, tp, message):
    ckpt = _config_only(tmp_path, tiny_ckpt_dir, **llm)
    r = CliRunner().invoke(build_cli, ["plan", "--target", "h100", "--checkpoint", str(ckpt), "--tp", str(tp)])
    assert message in _one_line_error(r)


def test_plan_refuses_more_stages_than_layers(tmp_path, tiny_ckpt_dir):
    ckpt = _config_only(tmp_path, tiny_ckpt_dir, num_hidden_layers=2, hybrid_override_pattern="M*")
    r = CliRunner().invoke(build_cli, ["plan", "--target", "h100", "--checkpoint", str(ckpt), "--pp", "4"])
    assert "pipeline_parallel 4 is more than the checkpoint's 2 layers" in _one_line_error(r)
    cfg = parse_vlm_config(json.loads((ckpt / "config.json").read_text()))
    with pytest.raises(PlanError, match="every stage needs at least one layer"):
        check_parallel(cfg.llm, load_target("h100").with_parallel(pipeline_parallel=4).parallel)


def test_cpu_target_refuses_tp_and_pp(tmp_path, tiny_ckpt_dir):
    msg = "target cpu: a cpu target runs the CPU reference engine in one process"
    for cmd in (["plan", "--target", "cpu", "--checkpoint", str(tiny_ckpt_dir), "--tp", "2"],
                ["engines", "--target", "cpu", "--checkpoint", str(tiny_ckpt_dir), "--out", str(tmp_path / "e"),
                 "--pp", "2"]):
        assert msg in _one_line_error(CliRunner().invoke(build_cli, cmd))
    assert not (tmp_path / "e").exists()  # refused before anything was built


# ---- YAML keys ---------------------------------------------------------------------------------------------
def _write(tmp_path: Path, base: str, changes: dict, drop: tuple[str, ...] = ()) -> Path:
    data = yaml.safe_load((BUILD_CONFIGS_DIR / f"{base}.yaml").read_text())
    for key, value in changes.items():
        d = data
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    for key in drop:
        d = data
        *parents, last = key.split(".")
        for p in parents:
            d = d[p]
        d.pop(last)
    path = tmp_path / f"{base}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_builtin_parallel_serving_and_tflops():
    for name in ("a100", "l40s", "h100", "b200", "cpu"):
        t = load_target(name)
        assert (t.parallel.tensor_parallel, t.parallel.pipeline_parallel, t.parallel.world_size) == (1, 1, 1)
        assert (t.serving.preprocessor_instances, t.serving.vision_instances) == (1, 1)
        assert (t.serving.cpu_ms_per_image, t.serving.cpu_ms_per_video_frame) == (90.0, 23.0)
        assert (t.serving.stream_interval, t.serving.stream_interval_min_batch) == (4, 2)
    assert load_target("h100").peak_tflops("fp8") == 1979 and load_target("b200").peak_tflops("nvfp4") == 9000
    assert load_target("cpu").peak_tflops("fp32") is None
    t = load_target("h100").with_parallel(tensor_parallel=4, pipeline_parallel=2)
    assert t.parallel.world_size == 8 and t.name == "h100"
    assert load_target("h100").with_parallel(pipeline_parallel=2).parallel.tensor_parallel == 1


@pytest.mark.parametrize("base,changes,message", [
    ("h100", {"parallel.tensor_parallel": 3}, "h100.yaml: 'parallel.tensor_parallel' must be a power of two >= 1"),
    ("h100", {"parallel.pipeline_parallel": 0}, "h100.yaml: 'parallel.pipeline_parallel' must be a power of two"),
    ("h100", {"parallel.tensor_parallel": "2"}, "h100.yaml: 'parallel.tensor_parallel' must be an integer, got str"),
    ("h100", {"parallel.tensor_parallel": True}, "h100.yaml: 'parallel.tensor_parallel' must be an integer, got bool"),
    ("h100", {"parallel.tensor_parallel": 8, "parallel.pipeline_parallel": 2},
     "h100.yaml: tensor_parallel × pipeline_parallel = 8 × 2 = 16 GPUs is more than one 8-GPU node"),
    ("h100", {"parallel.data_parallel": 2}, "h100.yaml: unknown key 'parallel.data_parallel'"),
    ("cpu", {"parallel.tensor_parallel": 2}, "cpu.yaml: a cpu target runs the CPU reference engine in one process"),
    ("h100", {"serving.vision_instances": 0}, "h100.yaml: 'serving.vision_instances' must be >= 1, got 0."),
    ("h100", {"serving.preprocessor_instances": 1.5}, "h100.yaml: 'serving.preprocessor_instances' must be an integer"),
    ("h100", {"serving.cpu_ms_per_image": -1}, "h100.yaml: 'serving.cpu_ms_per_image' must be > 0, got -1."),
    ("h100", {"serving.gpu_instances": 2}, "h100.yaml: unknown key 'serving.gpu_instances'"),
    ("cpu", {"serving.stream_interval": 0}, "cpu.yaml: 'serving.stream_interval' must be >= 1, got 0."),
    ("h100", {"serving.stream_interval_min_batch": 2.5},
     "h100.yaml: 'serving.stream_interval_min_batch' must be an integer"),
    ("h100", {"tensor_tflops.fp8": 0}, "h100.yaml: 'tensor_tflops.fp8' must be > 0, got 0."),
    ("h100", {"tensor_tflops.int4": 10}, "h100.yaml: unknown key 'tensor_tflops.int4'"),
])
def test_yaml_validation_errors(tmp_path, base, changes, message):
    with pytest.raises(TargetError) as e:
        load_target(_write(tmp_path, base, changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tensor_tflops_needs_every_offered_precision(tmp_path):
    with pytest.raises(TargetError, match=r"h100.yaml: 'tensor_tflops' has no entry for LLM precision bf16"):
        load_target(_write(tmp_path, "h100", {}, drop=("tensor_tflops.bf16",)))
    # no tensor_tflops at all: no prefill roofline, no preprocessing-cores line
    t = load_target(_write(tmp_path, "h100", {}, drop=("tensor_tflops",)))
    p = plan_memory(parse_vlm_config(preset_config("12b-config")), t)
    assert p.prefill_tokens_per_s_bound is None and p.preprocess_cores_images is None
    assert "preprocessing cores" not in format_plan(p)


def test_a_yaml_default_tp_is_used_and_flags_override_it(tmp_path, ckpt_12b):
    path = _write(tmp_path, "h100", {"parallel.tensor_parallel": 2})
    r = CliRunner().invoke(build_cli, ["plan", "--target", str(path), "--checkpoint", str(ckpt_12b), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["world_size"] == 2
    r = CliRunner().invoke(build_cli, ["plan", "--target", str(path), "--checkpoint", str(ckpt_12b), "--json",
                                       "--tp", "1", "--pp", "2"])
    data = json.loads(r.output)
    assert (data["tensor_parallel_size"], data["pipeline_parallel_size"], len(data["stages"])) == (1, 2, 2)


# ---- llm_api_options.yaml and the manifest ----------------------------------------------------------------
def test_llm_api_options_carry_the_parallel_sizes_as_upstream_fields(cfg):
    from nemovl_trt.build.trtllm_bundle import llm_api_options
    from tests.upstream_contract import fields

    t = load_target("h100").with_parallel(tensor_parallel=4, pipeline_parallel=2)
    opts = llm_api_options(t, plan_memory(cfg, t))
    assert (opts["tensor_parallel_size"], opts["pipeline_parallel_size"]) == (4, 2)
    torch_args = fields("tensorrt_llm", "tensorrt_llm.llmapi.llm_args.TorchLlmArgs")
    assert {"tensor_parallel_size", "pipeline_parallel_size"} <= torch_args
    assert {"tensor_parallel_size", "pipeline_parallel_size"} <= fields("tensorrt_llm",
                                                                        "tensorrt_llm.llmapi.llm_args.BaseLlmArgs")
    assert set(opts) - {"backend"} <= torch_args


def test_cpu_manifest_records_world_size_one(cpu_engines_dir):
    from nemovl_trt.build.manifest import load_manifest

    m = load_manifest(cpu_engines_dir)
    assert m["manifest_version"] == 2
    assert m["parallel"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "world_size": 1}
    assert m["serving"] == {"preprocessor_instances": 1, "vision_instances": 1, "stream_interval": 4,
                            "stream_interval_min_batch": 2}
    assert m["plan"]["world_size"] == 1 and len(m["plan"]["stages"]) == 1


def fake_build_vision_engine(target, onnx_path, plan_path, timing_cache, input_name, tile, profile) -> None:
    """FAKE TensorRT build (no GPU here): writes placeholder plan/cache files so the later steps can run."""
    plan_path.write_bytes(b"FAKE tensorrt plan for " + target.name.encode())
    timing_cache.write_bytes(b"FAKE timing cache")


def test_gpu_build_at_tp2_writes_the_sizes_and_the_world_size(tiny_ckpt_dir, tmp_path, monkeypatch):
    from nemovl_trt.build import engines
    from nemovl_trt.build.manifest import load_manifest

    monkeypatch.setattr(engines, "build_vision_engine", fake_build_vision_engine)
    out = tmp_path / "h100-tp2"
    r = CliRunner().invoke(build_cli, ["engines", "--target", "h100", "--checkpoint", str(tiny_ckpt_dir), "--out",
                                       str(out), "--llm-precision", "bf16", "--tp", "2"])
    assert r.exit_code == 0, r.output
    opts = yaml.safe_load((out / "llm" / "llm_api_options.yaml").read_text())
    assert (opts["tensor_parallel_size"], opts["pipeline_parallel_size"]) == (2, 1)
    assert "world size 2 (tp 2 × pp 1)" in (out / "llm" / "llm_api_options.yaml").read_text()
    m = load_manifest(out)
    assert m["parallel"] == {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "world_size": 2}
    assert m["serving"] == {"preprocessor_instances": 1, "vision_instances": 1, "stream_interval": 4,
                            "stream_interval_min_batch": 2}
    assert m["plan"]["stages"][0]["ranks"] == [0, 1]
    assert m["limits"]["max_batch_size"] == opts["max_batch_size"] == m["plan"]["engine_max_batch_size"]
    # another layout is another build: only the options and the manifest change
    r = CliRunner().invoke(build_cli, ["engines", "--target", "h100", "--checkpoint", str(tiny_ckpt_dir), "--out",
                                       str(out), "--llm-precision", "bf16", "--pp", "2"])
    assert r.exit_code == 0, r.output
    assert re.search(r"\[vision_onnx\] up to date", r.output) and re.search(r"\[llm_options\] built", r.output)
    assert load_manifest(out)["parallel"]["pipeline_parallel_size"] == 2


# ---- docs/deploy.md plan table ----------------------------------------------------------------------------
def _deploy_region() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- plan-table:begin -->\n(.*?)<!-- plan-table:end -->", text, re.S)
    assert m, "docs/deploy.md lacks the plan-table markers"
    return m.group(1)


def test_deploy_table_in_docs_is_the_generated_one(cfg):
    assert _deploy_region() == deploy_table(cfg), "regenerate: nemovl-build plan --table --checkpoint <12b-config>"


def test_plan_table_flag_prints_it(ckpt_12b, cfg):
    r = CliRunner().invoke(build_cli, ["plan", "--table", "--checkpoint", str(ckpt_12b)])
    assert r.exit_code == 0, r.output
    assert r.output == deploy_table(cfg)
    rows = [ln for ln in r.output.splitlines() if ln.startswith("| h100")]
    assert [ln.split("|")[2].strip() for ln in rows] == ["1", "2", "4", "8"]
    assert "Missing option '--target'" in _one_line_error(
        CliRunner().invoke(build_cli, ["plan", "--checkpoint", str(ckpt_12b)]))
    assert "--table prints every GPU target" in _one_line_error(
        CliRunner().invoke(build_cli, ["plan", "--table", "--target", "h100", "--checkpoint", str(ckpt_12b)]))
