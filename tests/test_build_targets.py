"""Build targets: the five YAML files load, and every schema / architecture error is one clear sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nemovl_trt.build.targets import BUILD_CONFIGS_DIR, TargetError, available_targets, load_target


def _write(tmp_path: Path, changes: dict, base: str = "h100", drop: tuple[str, ...] = ()) -> Path:
    data = yaml.safe_load((BUILD_CONFIGS_DIR / f"{base}.yaml").read_text())
    for key, value in changes.items():
        d = data
        *parents, last = key.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    for key in drop:
        data.pop(key)
    path = tmp_path / f"{base}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_builtin_targets_load_with_their_precisions():
    assert available_targets() == ["a100", "b200", "cpu", "h100", "l40s"]
    expect = {"a100": ("sm80", "bf16", "bf16", 2039), "l40s": ("sm89", "fp8", "fp8", 864),
              "h100": ("sm90", "fp8", "fp8", 3350), "b200": ("sm100", "nvfp4", "fp8", 8000),
              "cpu": ("none", "fp32", "fp32", 10)}
    for name, (arch, llm, kv, bw) in expect.items():
        t = load_target(name)
        assert (t.name, t.arch, t.llm_precision, t.kv_cache_dtype, t.hbm_bandwidth_gbps) == (name, arch, llm, kv, bw)
        assert t.vision_precision == ("fp32" if name == "cpu" else "fp16")
        assert (t.limits.max_num_tiles, t.limits.max_images, t.limits.max_video_frames) == (12, 4, 128)
        assert t.trtllm.enable_block_reuse is False and t.trtllm.mamba_ssm_cache_dtype == "float32"
    assert load_target("cpu").limits.max_batch_size == 8
    assert load_target("a100").gpu_memory_gib == 80 and load_target("l40s").gpu_memory_gib == 45


def test_load_by_path_equals_load_by_name():
    assert load_target(BUILD_CONFIGS_DIR / "h100.yaml") == load_target("h100")


def test_b200_offers_fp8_and_h100_cannot_take_nvfp4():
    b = load_target("b200").with_llm_precision("fp8")
    assert (b.llm_precision, b.kv_cache_dtype) == ("fp8", "fp8")
    a = load_target("h100").with_llm_precision("bf16")
    assert (a.llm_precision, a.kv_cache_dtype) == ("bf16", "bf16")
    with pytest.raises(TargetError, match=r"llm_precision nvfp4 is not offered by target h100"):
        load_target("h100").with_llm_precision("nvfp4")


@pytest.mark.parametrize("base,changes,message", [
    ("a100", {"llm_precision": "fp8", "llm_precision_options": ["fp8"]},
     "a100.yaml: llm_precision fp8 needs sm89 or newer, but target a100 is sm80."),
    ("h100", {"llm_precision": "nvfp4", "llm_precision_options": ["nvfp4"]},
     "h100.yaml: llm_precision nvfp4 needs sm100 or newer, but target h100 is sm90."),
    ("l40s", {"llm_precision_options": ["fp8", "nvfp4"]},
     "l40s.yaml: llm_precision_options entry nvfp4 needs sm100 or newer, but target l40s is sm89."),
    ("a100", {"kv_cache_dtype": "fp8"}, "a100.yaml: kv_cache_dtype fp8 needs sm89 or newer, but target a100 is sm80."),
    ("cpu", {"llm_precision": "fp8", "llm_precision_options": ["fp8"]},
     "cpu.yaml: llm_precision fp8 needs an NVIDIA GPU (sm89 or newer), but target cpu is a cpu target."),
    ("cpu", {"vision_precision": "fp16"}, "cpu.yaml: vision_precision fp16 is not supported on a cpu target"),
    ("h100", {"max_batch": 4}, "h100.yaml: unknown key 'max_batch'"),
    ("h100", {"limits.max_tiles": 4}, "h100.yaml: unknown key 'limits.max_tiles'"),
    ("h100", {"trtllm.kv_fraction": 0.5}, "h100.yaml: unknown key 'trtllm.kv_fraction'"),
    ("h100", {"limits.max_batch_size": "64"}, "h100.yaml: 'limits.max_batch_size' must be an integer, got str '64'."),
    ("h100", {"limits.max_seq_len": True}, "h100.yaml: 'limits.max_seq_len' must be an integer, got bool True."),
    ("h100", {"gpu_memory_gib": "80GB"}, "h100.yaml: 'gpu_memory_gib' must be a number, got str '80GB'."),
    ("h100", {"trtllm.enable_chunked_prefill": "yes"}, "h100.yaml: 'trtllm.enable_chunked_prefill' must be true/false"),
    ("h100", {"arch": "sm75"}, "h100.yaml: arch 'sm75' is not one of"),
    ("h100", {"llm_precision": "int4"}, "h100.yaml: llm_precision 'int4' is not one of"),
    ("h100", {"limits.max_num_tokens": 0}, "h100.yaml: 'limits.max_num_tokens' must be >= 1, got 0."),
    ("h100", {"memory_fraction": 1.5}, "h100.yaml: 'memory_fraction' must be > 0.0 and <= 1.0, got 1.5."),
    ("h100", {"vision.opset": 13}, "h100.yaml: 'vision.opset' must be >= 17"),
    ("h100", {"trtllm.enable_block_reuse": True}, "h100.yaml: 'trtllm.enable_block_reuse' must be false"),
    ("h100", {"trtllm.cuda_graph_batch_sizes": [4, 2]}, "h100.yaml: 'trtllm.cuda_graph_batch_sizes' must be increasing"),
    ("h100", {"trtllm.enable_chunked_prefill": False},
     "h100.yaml: with 'trtllm.enable_chunked_prefill' false, 'limits.max_num_tokens' (8192) must be >= "
     "'limits.max_seq_len' (131072)."),
])
def test_validation_errors_name_file_key_and_target(tmp_path, base, changes, message):
    path = _write(tmp_path, changes, base)
    with pytest.raises(TargetError) as e:
        load_target(path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_key_and_bad_yaml(tmp_path):
    with pytest.raises(TargetError, match=r"h100.yaml: missing the key 'arch'\."):
        load_target(_write(tmp_path, {}, "h100", drop=("arch",)))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TargetError, match=r"bad.yaml: not valid YAML"):
        load_target(bad)
    with pytest.raises(TargetError, match=r"unknown target 'h200' \(choose from a100, b200, cpu, h100, l40s"):
        load_target("h200")


def test_builtin_error_names_the_repo_relative_file(tmp_path, monkeypatch):
    import nemovl_trt.build.targets as tg

    fake = tmp_path / "build_configs"
    fake.mkdir()
    _write(fake, {"llm_precision": "fp8", "llm_precision_options": ["fp8"]}, "a100")
    monkeypatch.setattr(tg, "BUILD_CONFIGS_DIR", fake)
    with pytest.raises(TargetError) as e:
        tg.load_target("a100")
    assert str(e.value) == "build_configs/a100.yaml: llm_precision fp8 needs sm89 or newer, but target a100 is sm80."


def test_cli_reports_a_bad_target_in_one_line(tmp_path):
    from nemovl_trt.checkpoint.synth import write_checkpoint
    from nemovl_trt.cli import build_cli

    write_checkpoint(tmp_path / "c", "12b-config")
    path = _write(tmp_path, {"llm_precision": "fp8", "llm_precision_options": ["fp8"]}, "a100")
    r = CliRunner().invoke(build_cli, ["plan", "--target", str(path), "--checkpoint", str(tmp_path / "c")])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "needs sm89 or newer" in lines[0]
