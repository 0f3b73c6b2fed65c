"""scripts/gpu_acceptance.py (`make gpu-acceptance`): GPU detection and target mapping on hand cases,
the report's rules (a step that did not run is never PASS), and the script run for real on this
machine (no GPU: the gpu steps are "skipped: no GPU", the cpu steps run and pass) and with a fake
nvidia-smi that claims an H100 (the GPU build fails, and the report says so with the log tail)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_acceptance.py"
STEPS = ("trtllm_hook", "engines", "repo", "serve", "conformance", "accuracy", "bench_formats", "load")
CPU_RUN = STEPS[1:]  # the cpu pass has no TensorRT-LLM
STEP_KEYS = {"name", "phase", "target", "status", "reason", "seconds", "command", "detail", "log", "log_tail", "key"}
TOP_KEYS = {"schema_version", "started_at", "finished_at", "wall_s", "host", "versions", "gpu", "gpu_probe", "target",
            "options", "steps", "summary", "first_error"}


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("line, cap, target", [
    ("NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB, 535.104.05", "8.0", "a100"),
    ("NVIDIA L40S, 8.9, 46068 MiB, 550.54.15", "8.9", "l40s"),
    ("NVIDIA H100 80GB HBM3, 9.0, 81559 MiB, 550.54.15", "9.0", "h100"),
    ("NVIDIA H200, 9.0, 143771 MiB, 570.86.15", "9.0", "h100"),  # same arch: the h100 config (80 GiB assumed)
    ("NVIDIA B200, 10.0, 183359 MiB, 570.124.06", "10.0", "b200"),
    ("NVIDIA A10G, 8.6, 23028 MiB, 535.54.03", "8.6", None),  # sm86: no build config
])
def test_nvidia_smi_row_to_target(acc, line, cap, target):
    (gpu,) = acc.parse_nvidia_smi(line + "\n")
    assert gpu["capability"] == cap and gpu["memory_mib"] == int(line.split(", ")[2].split()[0])
    assert acc.target_for_arch(acc.arch_of(cap)) == target


def test_nvidia_smi_parsing_skips_junk_and_counts_gpus(acc):
    text = "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB, 550.54.15\nNVIDIA H100 80GB HBM3, 9.0, 81559 MiB, 550.54.15\n"
    assert len(acc.parse_nvidia_smi(text)) == 2
    assert acc.parse_nvidia_smi("No devices were found\n") == []
    assert acc.arch_of("10.0") == "sm100" and acc.arch_of("8.9") == "sm89"


def _report(acc, statuses):
    steps = []
    for i, (status, reason) in enumerate(statuses):
        s = acc.Step(STEPS[i], "gpu", "h100", status=status, reason=reason, seconds=1.0)
        steps.append({**acc.asdict(s), "key": s.key})
    objs = [acc.Step(s["name"], s["phase"], s["target"], status=s["status"]) for s in steps]
    return {"summary": acc.summarize(objs), "gpu": None, "gpu_probe": ["nvidia-smi not found"], "target": None,
            "options": {"checkpoint": "c", "quick": True}, "versions": {"python": "3"}, "steps": steps,
            "first_error": None, "wall_s": 3.0, "finished_at": "now"}


def test_summary_never_says_pass_when_a_step_did_not_run(acc):
    r = _report(acc, [("pass", None), ("skipped", "no GPU")])
    assert r["summary"] == {"passed": 1, "failed": 0, "skipped": 1, "overall": "incomplete"}
    md = acc.render_markdown(r)
    assert "INCOMPLETE" in md and "| gpu.engines | h100 | skipped: no GPU |" in md
    assert not re.search(r"^\*\*PASS", md, re.MULTILINE)
    r = _report(acc, [("pass", None), ("fail", "exit 1: boom"), ("skipped", "gpu.engines did not pass")])
    assert r["summary"]["overall"] == "fail" and "**FAIL**: exit 1: boom" in acc.render_markdown(r)
    r = _report(acc, [("pass", None), ("pass", None)])
    assert r["summary"]["overall"] == "pass" and "**PASS" in acc.render_markdown(r)


def _run(tmp: Path, *args: str, env: dict | None = None) -> tuple[int, dict, str, str]:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script stops the server it started on SIGTERM
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the acceptance script ran over 540 s:\n{out[-3000:]}")
    report = json.loads((tmp / "acceptance-report.json").read_text())
    md = (tmp / "acceptance-report.md").read_text()
    return proc.returncode, report, md, out


def _no_gpu_here() -> bool:
    from shutil import which

    import torch

    return which("nvidia-smi") is None and not torch.cuda.is_available()


@pytest.mark.integration
@pytest.mark.skipif(not _no_gpu_here(), reason="this machine has a GPU: the no-GPU report does not apply")
def test_script_on_this_machine_without_a_gpu(tmp_path: Path):
    rc, r, md, out = _run(tmp_path)
    assert rc == 3, out  # nothing failed, GPU steps skipped
    assert set(r) == TOP_KEYS and r["schema_version"] == 1
    assert r["gpu"] is None and r["target"] is None and "nvidia-smi not found" in r["gpu_probe"]
    assert r["versions"]["nemovl-trt"] and r["versions"]["torch"] and r["versions"]["python"]
    steps = {s["key"]: s for s in r["steps"]}
    assert list(steps) == ["detect"] + [f"gpu.{n}" for n in STEPS] + [f"cpu.{n}" for n in STEPS]
    assert all(set(s) == STEP_KEYS for s in r["steps"])
    assert steps["detect"]["status"] == "pass"
    for n in STEPS:
        g = steps[f"gpu.{n}"]
        assert g["status"] == "skipped" and g["reason"].startswith("no GPU") and g["seconds"] is None
        assert f"| gpu.{n} | — | skipped: no GPU" in md
    for n in CPU_RUN:
        c = steps[f"cpu.{n}"]
        assert c["status"] == "pass", (n, c["reason"], c["log_tail"])
        assert c["target"] == "cpu" and c["seconds"] >= 0
        assert f"| cpu.{n} | cpu | PASS |" in md
    assert steps["cpu.trtllm_hook"]["status"] == "skipped" and "reference engine" in steps["cpu.trtllm_hook"]["reason"]
    assert r["summary"] == {"passed": 8, "failed": 0, "skipped": 9, "overall": "incomplete"}
    assert r["first_error"] is None and "INCOMPLETE" in md
    # the steps did the work they claim
    assert steps["cpu.engines"]["detail"]["vision_runtime"] == "onnxruntime"
    assert steps["cpu.conformance"]["detail"]["tests"] >= 9 and steps["cpu.conformance"]["detail"]["failures"] == 0
    acc_detail = steps["cpu.accuracy"]["detail"]
    assert acc_detail["n"] == 35 and min(acc_detail["per_type"].values()) >= 0.9
    assert set(steps["cpu.bench_formats"]["detail"]["per_format"]) == {"docvqa", "chartqa", "ai2d", "videomme"}
    load = steps["cpu.load"]["detail"]
    assert load["text"]["errors"] == 0 and load["text"]["requests"] == 8 and load["image"]["requests"] == 4
    assert steps["cpu.serve"]["detail"]["tritonserver_version"]


@pytest.mark.integration
def test_script_reports_a_failed_gpu_build_with_its_log(tmp_path: Path):
    if not _no_gpu_here():
        pytest.skip("needs a machine without a GPU (a fake nvidia-smi claims one)")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0, 81559 MiB, 550.54.15'\n")
    (fake / "nvidia-smi").chmod(0o755)
    work = tmp_path / "w"
    rc, r, md, out = _run(work, "--cpu-pass", "never", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert rc == 1, out
    assert r["gpu"]["name"] == "NVIDIA H100 80GB HBM3" and r["gpu"]["arch"] == "sm90" and r["target"] == "h100"
    steps = {s["key"]: s for s in r["steps"]}
    hook = steps["gpu.trtllm_hook"]  # no TensorRT-LLM here: the check runs and fails, saying why
    assert hook["status"] == "fail" and "No module named 'tensorrt_llm'" in hook["reason"]
    eng = steps["gpu.engines"]
    assert eng["status"] == "fail" and "needs an NVIDIA GPU (sm90) and TensorRT" in eng["reason"]
    assert eng["command"].startswith("nemovl-build engines --target h100")
    assert [steps[f"gpu.{n}"]["status"] for n in STEPS[2:]] == ["skipped"] * 6
    assert steps["gpu.repo"]["reason"] == "gpu.engines did not pass"
    assert all(steps[f"cpu.{n}"]["reason"] == "--cpu-pass never" for n in STEPS)
    assert r["summary"]["overall"] == "fail"
    assert r["first_error"]["step"] == "gpu.trtllm_hook"  # the first failure, in step order
    assert "[vision_onnx]" in eng["log_tail"]
    assert "## First error" in md and "| gpu.engines | h100 | **FAIL**: exit 1: Error: target h100 needs an NVIDIA GPU" in md


def _hook_module():
    spec = importlib.util.spec_from_file_location("check_trtllm_hook", ROOT / "scripts" / "check_trtllm_hook.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("members, present", [
    (("supports_token_id_mm_expansion", "attach_multimodal_embeddings", "_attach_multimodal_embeddings_impl",
      "_detokenize_to_text_prompt", "call_with_text_prompt"), True),
    (("attach_multimodal_embeddings", "call_with_text_prompt"), False),  # a TensorRT-LLM from before 2026-05
])
def test_trtllm_hook_check(monkeypatch, members, present):
    import types

    names = ["tensorrt_llm", "tensorrt_llm._torch", "tensorrt_llm._torch.models",
             "tensorrt_llm._torch.models.modeling_nemotron_nano"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    cls = type("NanoV2VLInputProcessor", (), dict.fromkeys(members, None))
    sys.modules[names[-1]].NanoV2VLInputProcessor = cls
    hook = _hook_module()
    res = hook.check()
    assert res["present"] is present and res["error"] is None
    assert set(res["missing"]) == ({"supports_token_id_mm_expansion", "_attach_multimodal_embeddings_impl",
                                    "_detokenize_to_text_prompt"} if not present else set())
    assert hook.main(["--require", "1"]) == (0 if present else 1)
    assert hook.main(["--require", "0"]) == 0
