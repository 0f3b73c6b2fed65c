#!/usr/bin/env python3
"""`make gpu-acceptance`: one command that builds, serves and checks the whole stack on this machine and
writes one report (acceptance-report.md + acceptance-report.json).

    python scripts/gpu_acceptance.py [--checkpoint data/tiny-trained] [--workdir .cache/acceptance]
                                     [--target auto|a100|l40s|h100|b200] [--cpu-pass auto|always|never]
                                     [--quick] [--out DIR]

Steps, for the GPU target found (the "gpu" pass) and for the cpu target (the "cpu" pass):

1. ``detect``       the GPU (nvidia-smi, then torch.cuda) and the build target of its compute capability
                    (the ``arch`` of build_configs/*.yaml: sm80 a100, sm89 l40s, sm90 h100, sm100 b200)
   ``trtllm_hook``  (gpu pass) TensorRT-LLM imports and has the embeddings hook of docs/trtllm.md §3
                    (scripts/check_trtllm_hook.py)
2. ``engines``      ``nemovl-build engines --target T --checkpoint CKPT --out WORK/engines/T``
3. ``repo``         ``nemovl-build repo --engines … --out WORK/repo/T``
4. ``serve``        ``nemovl serve --repo … --engines-dir … --host 127.0.0.1 --port P`` until /v1/health/ready
5. ``conformance``  the OpenAI conformance tests (tests/test_acceptance_openai.py) against that server
6. ``accuracy``     ``nemovl eval --n N --seed 4242 --json``: every synthetic type ≥ 90 % (tiny-trained only)
7. ``bench_formats`` ``nemovl eval --dataset … --format docvqa|chartqa|ai2d|videomme`` on small files in those
                    formats written from the synthetic tasks (score ≥ 75 % for tiny-trained)
8. ``load``         a short closed-loop load through the OpenAI port (benchmarks/ harness): text at
                    concurrency 4 and one-image requests at concurrency 2, zero errors

A step that cannot run is reported as ``skipped: <why>`` (no GPU, an earlier step failed, a missing
package), never as passed. Exit status: 0 every step passed (GPU steps included); 1 a step failed;
3 nothing failed but some steps were skipped (e.g. no GPU on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINED = REPO_ROOT / "data" / "tiny-trained"
SCHEMA_VERSION = 1
PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
STEP_NAMES = ("trtllm_hook", "engines", "repo", "serve", "conformance", "accuracy", "bench_formats", "load")
ACCURACY_SEED = 4242
ACCURACY_MIN = 0.9  # per type, as tests/test_accuracy_e2e.py
BENCH_FORMATS_MIN = 0.75
LOG_TAIL_LINES = 40

if str(REPO_ROOT) not in sys.path:  # benchmarks/ and nemovl_trt/ from the checkout
    sys.path.insert(0, str(REPO_ROOT))


# ------------------------------------------------------------------------------------------- report
@dataclass
class Step:
    """One step of one pass. `status` is pass / fail / skipped; `reason` says why it was skipped or
    what failed (one line); `detail` holds the step's numbers."""

    name: str
    phase: str  # "detect", "gpu" or "cpu"
    target: str | None
    status: str = SKIPPED
    reason: str | None = None
    seconds: float | None = None
    command: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    log: str | None = None
    log_tail: str | None = None

    @property
    def key(self) -> str:
        return self.name if self.phase == "detect" else f"{self.phase}.{self.name}"


class StepFailed(Exception):
    """Raised inside a step: the step failed with this one-line message (and optional log tail)."""

    def __init__(self, message: str, log_tail: str | None = None):
        super().__init__(message)
        self.log_tail = log_tail


class StepSkipped(Exception):
    """Raised inside a step: it could not run, for this reason."""


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str | None:
    """The last `lines` lines of a log file (None when there is none)."""
    if path is None or not Path(path).is_file():
        return None
    text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run_step(step: Step, fn: Callable[[Step], None]) -> Step:
    """Run `fn(step)`; its outcome and wall time go into `step` (pass unless it raises)."""
    t0 = time.perf_counter()
    try:
        fn(step)
        step.status, step.reason = PASS, None
    except StepSkipped as e:
        step.status, step.reason = SKIPPED, str(e)
    except StepFailed as e:
        step.status, step.reason = FAIL, str(e)
        step.log_tail = e.log_tail or tail(Path(step.log) if step.log else None)
    except Exception as e:  # noqa: BLE001 - a crash of the step is its failure, with the reason
        step.status, step.reason = FAIL, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        step.log_tail = tail(Path(step.log) if step.log else None)
    step.seconds = round(time.perf_counter() - t0, 2)
    mark = {PASS: "PASS", FAIL: "FAIL", SKIPPED: "skipped"}[step.status]
    why = f": {step.reason}" if step.reason else ""
    print(f"[{step.key}] {mark}{why} ({step.seconds:.1f} s)", flush=True)
    return step


# ------------------------------------------------------------------------------------ GPU detection
def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Rows of ``nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader``."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not re.fullmatch(r"\d+\.\d+", parts[1]):
            continue
        mem = re.match(r"(\d+)", parts[2]) if len(parts) > 2 else None
        gpus.append({"name": parts[0], "capability": parts[1],
                     "memory_mib": int(mem.group(1)) if mem else None,
                     "driver": parts[3] if len(parts) > 3 else None})
    return gpus


def arch_of(capability: str) -> str:
    """``"9.0"`` → ``"sm90"``, ``"10.0"`` → ``"sm100"``."""
    major, minor = capability.split(".")
    return f"sm{int(major)}{int(minor)}"


def target_for_arch(arch: str) -> str | None:
    """The build_configs target whose ``arch`` is `arch` (None when none is)."""
    from nemovl_trt.build.targets import available_targets, load_target

    for name in available_targets():
        if name != "cpu" and load_target(name).arch == arch:
            return name
    return None


def detect_gpu() -> tuple[dict[str, Any] | None, list[str]]:
    """The first GPU (name, capability, arch, memory, driver, count, source) or None, and how it was looked for."""
    notes: list[str] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            gpus = parse_nvidia_smi(out.stdout) if out.returncode == 0 else []
            if gpus:
                return {**gpus[0], "arch": arch_of(gpus[0]["capability"]), "count": len(gpus),
                        "source": "nvidia-smi"}, notes
            notes.append(f"nvidia-smi found no GPU (exit {out.returncode}: {(out.stderr or out.stdout).strip()[:120]})")
        except (OSError, subprocess.TimeoutExpired) as e:
            notes.append(f"nvidia-smi failed ({type(e).__name__})")
    else:
        notes.append("nvidia-smi not found")
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            props = torch.cuda.get_device_properties(0)
            cap = f"{major}.{minor}"
            return {"name": torch.cuda.get_device_name(0), "capability": cap, "arch": arch_of(cap),
                    "memory_mib": int(props.total_memory // 2**20), "driver": None,
                    "count": torch.cuda.device_count(), "source": "torch.cuda"}, notes
        notes.append(f"torch.cuda.is_available() is False (torch {torch.__version__})")
    except ImportError:
        notes.append("torch not importable")
    return None, notes


# ------------------------------------------------------------------------------------------ versions
def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Package versions, Python, the platform, the git commit and the tritonserver binary."""
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("nemovl-trt", "torch", "numpy", "onnx", "onnxruntime", "tensorrt", "tensorrt-llm",
                 "nvidia-modelopt", "transformers", "tritonclient", "nvidia-pytriton", "openai", "pyarrow"):
        out[dist] = _dist_version(dist)
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except OSError:
        out["git_commit"] = None
    try:
        from nemovl_trt.triton.launcher import find_tritonserver

        out["tritonserver_binary"] = str(find_tritonserver().binary)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal here (the serve step reports it)
        out["tritonserver_binary"] = f"not found ({str(e).splitlines()[0][:100]})"
    return out


# ---------------------------------------------------------------------------------------- the steps
def _tool(name: str) -> list[str]:
    """How to run a console script of this project: next to this Python, else on PATH, else via -c."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    entry = {"nemovl-build": "build_cli", "nemovl": "serve_cli"}[name]
    return [sys.executable, "-c", f"import sys; from nemovl_trt.cli import {entry}; sys.exit({entry}())"]


def run_logged(step: Step, argv: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None,
               display: str | None = None) -> subprocess.CompletedProcess:
    """Run a command with stdout+stderr to `log`; raises StepFailed on a non-zero exit or a timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    step.log = str(log)
    step.command = display or " ".join(argv)
    with log.open("w", encoding="utf-8") as fh:
        try:
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO_ROOT,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            raise StepFailed(f"timed out after {timeout_s:.0f} s", tail(log)) from None
    if proc.returncode != 0:
        last = [ln for ln in (tail(log, 200) or "").splitlines() if ln.strip()]
        err = next((ln for ln in reversed(last) if "Error" in ln or "error" in ln), last[-1] if last else "")
        raise StepFailed(f"exit {proc.returncode}: {err.strip()[:300]}", tail(log))
    return proc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """What one pass builds and starts."""

    target: str
    engines: Path
    repo: Path
    base_url: str | None = None
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        """Stop the `nemovl serve` process this script started (its own process group), if running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@dataclass
class Options:
    checkpoint: Path
    workdir: Path
    quick: bool
    eval_n: int
    serve_timeout_s: float
    step_timeout_s: float
    llm_precision: str | None
    synthetic_gate: bool


def step_trtllm_hook(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        log = opt.workdir / "logs" / f"{step.key}.log"
        argv = [sys.executable, str(REPO_ROOT / "scripts" / "check_trtllm_hook.py"), "--json"]
        run_logged(step, argv, log, 300, display="python scripts/check_trtllm_hook.py --json")
        step.detail = json.loads(log.read_text().strip().splitlines()[-1])
        if not step.detail["present"]:
            raise StepFailed(step.detail["error"] or f"TensorRT-LLM {step.detail['tensorrt_llm']} lacks "
                             f"{', '.join(step.detail['missing'])} (docs/trtllm.md §3: after 2026-05 needed)")
    return fn


def step_engines(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        argv = [*_tool("nemovl-build"), "engines", "--target", stack.target, "--checkpoint", str(opt.checkpoint),
                "--out", str(stack.engines)]
        if opt.llm_precision and stack.target != "cpu":
            argv += ["--llm-precision", opt.llm_precision]
        run_logged(step, argv, opt.workdir / "logs" / f"{step.key}.log", opt.step_timeout_s,
                   display="nemovl-build " + " ".join(argv[len(_tool("nemovl-build")):]))
        manifest = json.loads((stack.engines / "manifest.json").read_text())
        step.detail = {"vision_runtime": manifest["vision"]["runtime"], "llm_engine": manifest["llm"]["engine"],
                       "precisions": manifest["precisions"], "build_seconds": manifest.get("build_seconds"),
                       "onnx_max_abs_error": manifest.get("onnx_check", {}).get("max_abs_error")}
        if stack.target != "cpu" and manifest["vision"]["runtime"] != "tensorrt":
            raise StepFailed(f"the {stack.target} manifest's vision runtime is {manifest['vision']['runtime']}, "
                             f"not tensorrt")
    return fn


def step_repo(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        tool = _tool("nemovl-build")
        argv = [*tool, "repo", "--engines", str(stack.engines), "--out", str(stack.repo)]
        run_logged(step, argv, opt.workdir / "logs" / f"{step.key}.log", opt.step_timeout_s,
                   display="nemovl-build " + " ".join(argv[len(tool):]))
        step.detail = {"models": sorted(p.name for p in stack.repo.iterdir() if (p / "config.pbtxt").is_file())}
    return fn


def step_serve(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        import httpx

        port = _free_port()
        tool = _tool("nemovl")
        argv = [*tool, "serve", "--repo", str(stack.repo), "--engines-dir", str(stack.engines), "--host",
                "127.0.0.1", "--port", str(port), "--allow-media-host", "127.0.0.1", "--log-level", "warning"]
        log = opt.workdir / "logs" / f"{step.key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        step.log, step.command = str(log), "nemovl " + " ".join(argv[len(tool):])
        fh = log.open("w", encoding="utf-8")
        stack.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                      start_new_session=True)
        fh.close()
        root = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        deadline = time.monotonic() + opt.serve_timeout_s
        while True:
            if stack.proc.poll() is not None:
                raise StepFailed(f"nemovl serve exited with {stack.proc.returncode} before it was ready", tail(log))
            try:
                if httpx.get(root + "/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StepFailed(f"not ready within {opt.serve_timeout_s:.0f} s", tail(log))
            time.sleep(0.25)
        stack.base_url = root + "/v1"
        step.detail = {"base_url": stack.base_url, "ready_s": round(time.perf_counter() - t0, 2)}
        m = re.search(r"gRPC (\S+?:\d+)", log.read_text(encoding="utf-8", errors="replace"))
        if m:
            step.detail["triton_grpc"] = m.group(1)
            try:
                import tritonclient.grpc as grpcclient

                meta = grpcclient.InferenceServerClient(m.group(1)).get_server_metadata(as_json=True)
                step.detail["tritonserver_version"] = meta.get("version")
            except Exception as e:  # noqa: BLE001 - informational only
                step.detail["tritonserver_version"] = f"unknown ({type(e).__name__})"
    return fn


def step_conformance(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        if importlib.util.find_spec("pytest") is None:
            raise StepSkipped("pytest is not installed (pip install pytest pytest-timeout)")
        if importlib.util.find_spec("openai") is None:
            raise StepSkipped("openai is not installed (pip install -e '.[client]')")
        junit = opt.workdir / "logs" / f"{step.key}.xml"
        per_test = max(30, int(min(opt.step_timeout_s, 600) // 3))
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "integration",
                "tests/test_acceptance_openai.py", f"--junitxml={junit}"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            argv.append(f"--timeout={per_test}")
        try:
            run_logged(step, argv, opt.workdir / "logs" / f"{step.key}.log", opt.step_timeout_s,
                       env={"NEMOVL_ACCEPTANCE_BASE_URL": stack.base_url or ""},
                       display=f"NEMOVL_ACCEPTANCE_BASE_URL={stack.base_url} pytest tests/test_acceptance_openai.py")
        finally:
            if junit.is_file():
                suite = ET.parse(junit).getroot()
                suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
                step.detail = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
                step.detail["failed_tests"] = [tc.get("name") for tc in suite.iter("testcase")
                                               if tc.find("failure") is not None or tc.find("error") is not None]
        d = step.detail
        if not d or d["tests"] == 0 or d["skipped"] == d["tests"]:
            raise StepFailed("no conformance test ran")
        if d["skipped"]:
            raise StepFailed(f"{d['skipped']} of {d['tests']} conformance tests were skipped")
    return fn


def step_accuracy(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        if not opt.synthetic_gate:
            raise StepSkipped("the synthetic-task gate applies to data/tiny-trained only (use --synthetic-gate "
                              "to force it); score a real checkpoint with nemovl eval --dataset")
        if importlib.util.find_spec("openai") is None:
            raise StepSkipped("openai is not installed (pip install -e '.[client]')")
        tool = _tool("nemovl")
        argv = [*tool, "eval", "--server", stack.base_url or "", "--n", str(opt.eval_n), "--seed",
                str(ACCURACY_SEED), "--json"]
        log = opt.workdir / "logs" / f"{step.key}.log"
        run_logged(step, argv, log, opt.step_timeout_s, display="nemovl " + " ".join(argv[len(tool):]))
        result = json.loads(log.read_text().strip().splitlines()[-1])
        step.detail = {"n": opt.eval_n, "seed": ACCURACY_SEED, "min_per_type": ACCURACY_MIN, **result}
        low = {t: a for t, a in result["per_type"].items() if a < ACCURACY_MIN}
        if low:
            raise StepFailed("below 90 %: " + ", ".join(f"{t} {a:.0%}" for t, a in low.items()))
    return fn


def step_bench_formats(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        if importlib.util.find_spec("pyarrow") is None:
            raise StepSkipped("pyarrow is not installed (pip install -e '.[client]')")
        from nemovl_trt.evaluation.synthetic import write_benchmark

        n = 3 if opt.quick else 6
        tool = _tool("nemovl")
        data = opt.workdir / "bench_formats"
        scores: dict[str, Any] = {}
        log = opt.workdir / "logs" / f"{step.key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        step.log = str(log)
        step.command = "nemovl eval --dataset FILE --format F --prompt raw --json  (F = docvqa, chartqa, ai2d, videomme)"
        for fmt in ("docvqa", "chartqa", "ai2d", "videomme"):
            path = write_benchmark(fmt, data / fmt, n)
            argv = [*tool, "eval", "--server", stack.base_url or "", "--dataset", str(path), "--format", fmt,
                    "--prompt", "raw", "--json", "--no-progress", "--max-tokens", "8"]
            if fmt == "videomme":
                argv += ["--video-pruning-rate", "0.7"]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=opt.step_timeout_s, cwd=REPO_ROOT)
            with log.open("a", encoding="utf-8") as fh:
                fh.write(f"$ nemovl {' '.join(argv[len(tool):])}\n{proc.stdout}{proc.stderr}\n")
            if proc.returncode != 0:
                raise StepFailed(f"{fmt}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}",
                                 tail(log))
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            scores[fmt] = {"metric": out["metric"], "score": out["score"], "n": out["n"], "errors": out["errors"]}
        step.detail = {"per_format": scores, "min_score": BENCH_FORMATS_MIN if opt.synthetic_gate else None}
        bad = [f for f, s in scores.items() if s["errors"]]
        if bad:
            raise StepFailed(f"request errors in {', '.join(bad)}")
        if opt.synthetic_gate:
            low = [f"{f} {s['score']:.0%}" for f, s in scores.items() if s["score"] < BENCH_FORMATS_MIN]
            if low:
                raise StepFailed("below 75 %: " + ", ".join(low))
    return fn


def step_load(stack: Stack, opt: Options) -> Callable[[Step], None]:
    def fn(step: Step) -> None:
        if importlib.util.find_spec("openai") is None:
            raise StepSkipped("openai is not installed (pip install -e '.[client]')")
        import httpx

        from benchmarks.clients import OpenAIClient, Workload
        from benchmarks.common import make_jpeg
        from benchmarks.loadgen import closed_loop

        model = httpx.get((stack.base_url or "") + "/models", timeout=30).json()["data"][0]["id"]
        text = Workload("text", "Write a short story about a robot.",
                        params={"max_tokens": 16, "temperature": 0.0, "ignore_eos": True})
        image = Workload("image", "Describe the image.", images=(make_jpeg(1024, 512),),
                         params={"max_tokens": 16, "temperature": 0.0, "ignore_eos": True})
        plan = [(text, 4, 8 if opt.quick else 32), (image, 2, 4 if opt.quick else 8)]
        step.command = "benchmarks/ closed loop (OpenAI SDK, streamed): " + ", ".join(
            f"{w.name} c={c} n={n}" for w, c, n in plan)

        async def run() -> dict[str, Any]:
            client = OpenAIClient(stack.base_url or "", model)
            out = {}
            try:
                for w, c, n in plan:
                    res = await closed_loop(lambda _i, w=w: client.send(w), c, n, 60.0)
                    s = res.summary()
                    out[w.name] = {k: s[k] for k in ("concurrency", "requests", "errors", "error_samples",
                                                     "request_throughput_rps", "output_token_throughput_tps")}
                    out[w.name]["ttft_ms_p50"] = s["ttft_ms"].get("p50")
                    out[w.name]["e2e_ms_p50"] = s["e2e_ms"].get("p50")
            finally:
                await client.close()
            return out

        step.detail = asyncio.run(run())
        errors = sum(v["errors"] for v in step.detail.values())
        if errors or any(v["requests"] == 0 for v in step.detail.values()):
            first = next((v["error_samples"][0] for v in step.detail.values() if v["error_samples"]), "")
            raise StepFailed(f"{errors} failed request(s): {first}")
    return fn


STEP_FUNCS = {"trtllm_hook": step_trtllm_hook, "engines": step_engines, "repo": step_repo, "serve": step_serve, "conformance": step_conformance,
              "accuracy": step_accuracy, "bench_formats": step_bench_formats, "load": step_load}
NEEDS = {"repo": "engines", "serve": "repo", "conformance": "serve", "accuracy": "serve", "bench_formats": "serve",
         "load": "serve"}


def run_pass(phase: str, target: str | None, skip_reason: str | None, opt: Options) -> list[Step]:
    """Every step of one pass; all skipped with `skip_reason` when given."""
    steps = [Step(name, phase, target) for name in STEP_NAMES]
    if skip_reason is not None or target is None:
        for s in steps:
            s.status, s.reason = SKIPPED, skip_reason or "no target"
            print(f"[{s.key}] skipped: {s.reason}", flush=True)
        return steps
    stack = Stack(target, opt.workdir / "engines" / target, opt.workdir / "repo" / target)
    by_name = {s.name: s for s in steps}
    try:
        for s in steps:
            if s.name == "trtllm_hook" and target == "cpu":
                s.status, s.reason = SKIPPED, "the cpu target runs the reference engine, not TensorRT-LLM"
                print(f"[{s.key}] skipped: {s.reason}", flush=True)
                continue
            dep = NEEDS.get(s.name)
            if dep is not None and by_name[dep].status != PASS:
                s.status, s.reason = SKIPPED, f"{phase}.{dep} did not pass"
                print(f"[{s.key}] skipped: {s.reason}", flush=True)
                continue
            run_step(s, STEP_FUNCS[s.name](stack, opt))
    finally:
        stack.stop()
    return steps


# ------------------------------------------------------------------------------------------ writing
def summarize(steps: list[Step]) -> dict[str, Any]:
    counts = {st: sum(s.status == st for s in steps) for st in (PASS, FAIL, SKIPPED)}
    overall = "fail" if counts[FAIL] else "pass" if counts[SKIPPED] == 0 else "incomplete"
    return {"passed": counts[PASS], "failed": counts[FAIL], "skipped": counts[SKIPPED], "overall": overall}


def render_markdown(report: dict[str, Any]) -> str:
    """acceptance-report.md: the verdict, versions, GPU, one row per step, the first error's log tail."""
    s = report["summary"]
    verdict = {"pass": "PASS — every step ran and passed",
               "fail": f"FAIL — {s['failed']} step(s) failed",
               "incomplete": f"INCOMPLETE — nothing failed, but {s['skipped']} step(s) did not run (see below)"}
    gpu = report["gpu"]
    lines = ["# nemovl-trt acceptance report", "",
             f"**{verdict[s['overall']]}** ({s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped; "
             f"{report['wall_s']:.0f} s, {report['finished_at']})", "",
             "## Machine", "",
             f"- GPU: {gpu['name'] + ' (compute ' + gpu['capability'] + ', ' + gpu['arch'] + ', ' + str(gpu['memory_mib']) + ' MiB, via ' + gpu['source'] + ')' if gpu else 'none (' + '; '.join(report['gpu_probe']) + ')'}",
             f"- GPU target: {report['target'] or 'none'}; checkpoint: `{report['options']['checkpoint']}`"
             f"{' (quick mode)' if report['options']['quick'] else ''}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), "",
             "## Steps", "",
             "| step | target | result | seconds | detail |", "|---|---|---|---|---|"]
    for st in report["steps"]:
        result = {PASS: "PASS", FAIL: "**FAIL**: " + (st["reason"] or ""),
                  SKIPPED: "skipped: " + (st["reason"] or "")}[st["status"]]
        detail = _short_detail(st)
        secs = f"{st['seconds']:.1f}" if st["seconds"] is not None else "—"
        lines.append(f"| {st['key']} | {st['target'] or '—'} | {result} | {secs} | {detail} |")
    fe = report["first_error"]
    if fe:
        lines += ["", "## First error", "", f"`{fe['step']}`: {fe['message']}", ""]
        if fe.get("command"):
            lines += [f"command: `{fe['command']}`", ""]
        if fe.get("log_tail"):
            lines += ["```", fe["log_tail"], "```"]
    lines += ["", "Result words: PASS = the step ran and met its check; FAIL = it ran and did not; "
              "skipped = it did not run (the reason says why) — a skipped step is never counted as passed.", ""]
    return "\n".join(lines)


def _short_detail(st: dict[str, Any]) -> str:
    d = st["detail"] or {}
    if st["name"] == "detect":
        return d.get("summary", "")
    if st["status"] != PASS:
        return ""
    if st["name"] == "trtllm_hook":
        return f"TensorRT-LLM {d.get('tensorrt_llm')}"
    if st["name"] == "engines":
        return f"vision {d.get('vision_runtime')}, llm {d.get('llm_engine')}, {d.get('precisions', {}).get('llm')}"
    if st["name"] == "serve":
        return f"ready in {d.get('ready_s')} s, tritonserver {d.get('tritonserver_version')}"
    if st["name"] == "conformance":
        return f"{d.get('tests')} tests"
    if st["name"] == "accuracy":
        return f"overall {d.get('overall', 0):.1%} on {d.get('n')} questions; min type " \
               f"{min(d.get('per_type', {}).values(), default=0):.0%}"
    if st["name"] == "bench_formats":
        return ", ".join(f"{f} {v['score']:.0%}" for f, v in d.get("per_format", {}).items())
    if st["name"] == "load":
        return "; ".join(f"{k} c={v['concurrency']}: {v['request_throughput_rps']:.2f} req/s, "
                         f"TTFT p50 {v['ttft_ms_p50']:.0f} ms" for k, v in d.items() if v.get("ttft_ms_p50"))
    return ", ".join(f"{k} {v}" for k, v in d.items() if isinstance(v, str | int | float))[:120]


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j = out / "acceptance-report.json"
    m = out / "acceptance-report.md"
    j.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    m.write_text(render_markdown(report), encoding="utf-8")
    return j, m


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_acceptance.py", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=TRAINED, help="checkpoint to build [data/tiny-trained]")
    ap.add_argument("--workdir", type=Path, default=REPO_ROOT / ".cache" / "acceptance")
    ap.add_argument("--out", type=Path, default=None, help="where the report goes [the workdir]")
    ap.add_argument("--target", default="auto", help="GPU target (auto: from the GPU's compute capability)")
    ap.add_argument("--cpu-pass", choices=("auto", "always", "never"), default="auto",
                    help="run the cpu target's steps: auto = only when no GPU pass runs")
    ap.add_argument("--llm-precision", default=None, help="passed to `nemovl-build engines` for the GPU target")
    ap.add_argument("--quick", action="store_true", help="fewer questions and requests (the test uses it)")
    ap.add_argument("--eval-n", type=int, default=None, help="synthetic questions for the accuracy step [140; quick 35]")
    ap.add_argument("--synthetic-gate", action="store_true",
                    help="apply the tiny-trained accuracy gates to another checkpoint too")
    ap.add_argument("--serve-timeout", type=float, default=None, help="seconds to wait for the server [cpu 180, gpu 600]")
    ap.add_argument("--step-timeout", type=float, default=None, help="seconds for any one command [600; quick 240]")
    args = ap.parse_args(argv)
    if args.step_timeout is None:
        args.step_timeout = 240.0 if args.quick else 600.0
    # SIGTERM (a CI runner, `timeout`) ends the run through the finally blocks, which stop the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint.resolve()
    print(f"acceptance: checkpoint {checkpoint}, workdir {workdir}", flush=True)

    # 1. detect
    detect = Step("detect", "detect", None)
    found: dict[str, Any] = {}

    def do_detect(step: Step) -> None:
        gpu, notes = detect_gpu()
        found["gpu"], found["notes"] = gpu, notes
        if args.target != "auto":
            from nemovl_trt.build.targets import load_target

            found["target"] = load_target(args.target).name
        else:
            found["target"] = target_for_arch(gpu["arch"]) if gpu else None
        step.target = found["target"]
        if gpu is None:
            step.detail = {"summary": "no NVIDIA GPU: " + "; ".join(notes)}
        elif found["target"] is None:
            step.detail = {"summary": f"{gpu['name']} is {gpu['arch']}: no build_configs target has that arch"}
        else:
            step.detail = {"summary": f"{gpu['name']} ({gpu['arch']}) → target {found['target']}"}
        step.detail.update({"gpu": gpu, "probe": notes})

    run_step(detect, do_detect)
    gpu, target = found.get("gpu"), found.get("target")
    if gpu is None:
        gpu_skip = "no GPU (" + "; ".join(found.get("notes") or ["detection failed"]) + ")"
    elif target is None:
        gpu_skip = f"no build target for {gpu['arch']} ({gpu['name']})"
    else:
        gpu_skip = None
    synthetic_gate = args.synthetic_gate or checkpoint == TRAINED.resolve()
    base = Options(checkpoint=checkpoint, workdir=workdir, quick=args.quick,
                   eval_n=args.eval_n or (35 if args.quick else 140), serve_timeout_s=600.0,
                   step_timeout_s=args.step_timeout, llm_precision=args.llm_precision, synthetic_gate=synthetic_gate)

    # 2. the gpu pass, then the cpu pass
    gpu_opt = Options(**{**asdict(base), "serve_timeout_s": args.serve_timeout or 600.0})
    steps = [detect] + run_pass("gpu", target, gpu_skip, gpu_opt)
    gpu_ran = gpu_skip is None
    if args.cpu_pass == "never":
        cpu_skip = "--cpu-pass never"
    elif args.cpu_pass == "auto" and gpu_ran:
        cpu_skip = "the GPU pass ran (--cpu-pass always runs the cpu target too)"
    else:
        cpu_skip = None
    cpu_opt = Options(**{**asdict(base), "serve_timeout_s": args.serve_timeout or 180.0})
    steps += run_pass("cpu", "cpu", cpu_skip, cpu_opt)

    first = next((s for s in steps if s.status == FAIL), None)
    report = {
        "schema_version": SCHEMA_VERSION,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "host": {"hostname": platform.node(), "cpus": os.cpu_count()},
        "versions": versions(),
        "gpu": gpu, "gpu_probe": found.get("notes") or [], "target": target,
        "options": {"checkpoint": str(checkpoint), "workdir": str(workdir), "quick": args.quick,
                    "cpu_pass": args.cpu_pass, "target": args.target, "synthetic_gate": synthetic_gate,
                    "eval_n": base.eval_n},
        "steps": [{**asdict(s), "key": s.key} for s in steps],
        "summary": summarize(steps),
        "first_error": None if first is None else {"step": first.key, "message": first.reason,
                                                   "command": first.command, "log": first.log,
                                                   "log_tail": first.log_tail},
    }
    j, m = write_report(report, (args.out or workdir).resolve())
    s = report["summary"]
    print(f"acceptance: {s['overall'].upper()} ({s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped) "
          f"in {report['wall_s']:.0f} s; report {m} and {j}", flush=True)
    return {"pass": 0, "fail": 1, "incomplete": 3}[s["overall"]]


if __name__ == "__main__":
    sys.exit(main())
