"""AIPerf against `nemovl serve`, next to our own harness at the same load (issue 17, part 6).

AIPerf (NVIDIA's successor of GenAI-Perf, `pip install aiperf`) lives in a virtual environment of its own,
`.cache/aiperf-venv` (`setup_aiperf`: `python -m venv` + pip), so its pins (pandas, scipy, datasets, ... and
older pillow / rich / prometheus-client than ours) never touch the project's `.venv`.

For each workload (text; one 1024×512 JPEG, 768 image tokens) and concurrency 1, 4, 8:

1. our harness (benchmarks/loadgen.py closed loop, plain-httpx SSE client `RawSSEClient`) sends N requests;
2. `aiperf profile --endpoint-type chat --streaming` sends the same N requests: the same prompt, the same
   image bytes (a `single_turn` JSONL dataset whose `image` is the data URL our client sends), the same
   `max_tokens`, greedy decoding, `ignore_eos`, token counts from the server's `usage`;
3. our harness again (A-B-A: the spread of the two own runs is the noise of this machine at that moment).

AIPerf's exported `profile_export_aiperf.json` gives TTFT, ITL, request latency and throughput; the target
per (workload, concurrency) is that its TTFT p50, ITL p50, e2e p50 and request throughput each agree with our
mean of the two runs within `tolerance = max(REL_TOLERANCE × ours, NOISE_FACTOR × |ours₁ − ours₂|)`.

Known reason for a disagreement on a loaded 2-core machine: AIPerf timestamps a token when its worker process
reads the socket; AIPerf runs ~6 processes (ZMQ services, worker, record processor) next to the server, and
when its worker is not scheduled the tokens wait in the socket buffer and are read together (the export's
socket reads per response, `chunks_received_mean`, drops far below the token count). TTFT then reads late and
ITL short, while e2e and throughput stay right; the detail of each target prints that count.

Definitions line up: TTFT = request sent → first SSE event with text (the frontend sends the role chunk in the
same write as the first text, so AIPerf's "first response" is that moment too); ITL = (e2e − TTFT) /
(tokens − 1) per request, p50 over requests; throughput = requests / (first send → last completion).

`python -m benchmarks.aiperf_bench [--quick]` (builds/reuses the cpu stack under .cache/bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.clients import RawSSEClient, Workload
from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    WORK_DIR,
    machine_info,
    print_targets,
    utc_now,
    write_json,
)
from benchmarks.loadgen import closed_loop
from benchmarks.serving_bench import DEFAULT_MODEL, build_workloads

AIPERF_SPEC = "aiperf==0.13.0"  # the version whose CLI (`aiperf profile --help`) this module was written against
AIPERF_VENV = REPO_ROOT / ".cache" / "aiperf-venv"
CONCURRENCIES = (1, 4, 8)
WORKLOADS = ("text", "image")
# Agreement: 10 % is about the run-to-run spread of TTFT and ITL p50 on the shared 2-core machines (several
# repeated runs of the same load by the same client); when the two own runs of this comparison differ by
# more, twice that difference is the tolerance instead.
REL_TOLERANCE = 0.10
NOISE_FACTOR = 2.0
COMPARED = (("ttft_p50_ms", "TTFT p50"), ("itl_p50_ms", "ITL p50"), ("e2e_p50_ms", "e2e p50"),
            ("request_throughput_rps", "req/s"))
INSTALL_TIMEOUT_S = 1800.0
RUN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Plan:
    """Requests per concurrency (text / media), warm-up requests, tokens per request."""

    text_requests: tuple[int, ...] = (12, 24, 32)  # for CONCURRENCIES
    media_requests: tuple[int, ...] = (6, 12, 16)
    warmup: int = 2
    max_tokens: int = 32
    loop_time_s: float = 120.0  # our loop's wall-clock cap (the request count ends it first)

    def requests(self, workload: str, concurrency: int) -> int:
        table = self.text_requests if workload == "text" else self.media_requests
        return table[CONCURRENCIES.index(concurrency)]


QUICK = Plan(text_requests=(3, 4, 8), media_requests=(2, 4, 8), warmup=1, max_tokens=8)


class AIPerfUnavailable(RuntimeError):
    """AIPerf could not be installed or run; the message says which step failed and why."""


def _tail(text: str, n: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def installed_version(venv: Path = AIPERF_VENV) -> str | None:
    """The aiperf version installed in `venv`, None when there is none."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    proc = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('aiperf'))"],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else None


def setup_aiperf(venv: Path = AIPERF_VENV, spec: str = AIPERF_SPEC, python: str = sys.executable) -> Path:
    """Create `venv` with `python -m venv` and pip-install `spec` there (skipped when that version is already
    installed); returns the `aiperf` executable. Raises AIPerfUnavailable with the failing step's output."""
    want = spec.partition("==")[2] or None
    exe = venv / "bin" / "aiperf"
    have = installed_version(venv)
    if exe.exists() and have is not None and (want is None or have == want):
        return exe
    if not (venv / "bin" / "python").exists():
        proc = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise AIPerfUnavailable(f"`{python} -m venv {venv}` failed (exit {proc.returncode}): "
                                    f"{_tail(proc.stdout + proc.stderr, 3)}")
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AIPerfUnavailable(f"`pip install {spec}` into {venv} took longer than {INSTALL_TIMEOUT_S:.0f} s") from e
    if proc.returncode != 0 or not exe.exists():
        raise AIPerfUnavailable(f"`pip install {spec}` into {venv} failed (exit {proc.returncode}): "
                                f"{_tail(proc.stdout + proc.stderr, 5)}")
    return exe


def dataset_lines(workload: Workload, n: int, max_tokens: int) -> list[str]:
    """AIPerf `single_turn` JSONL lines for `workload`: the prompt, the image as the data URL our client sends
    (AIPerf passes data URLs through unchanged; a file path it would re-encode), the output length."""
    if workload.video is not None or len(workload.images) > 1:
        raise ValueError("the AIPerf comparison covers text and one-image workloads")
    row: dict[str, Any] = {"text": workload.prompt, "output_length": max_tokens}
    if workload.images:
        row["image"] = f"data:{workload.image_mime};base64,{base64.b64encode(workload.images[0]).decode('ascii')}"
    line = json.dumps(row)
    return [line] * n


def extra_inputs(workload: Workload) -> dict[str, Any]:
    """The request fields besides the prompt and max tokens (AIPerf's `--extra-inputs` JSON)."""
    return {k: v for k, v in workload.params.items() if k != "max_tokens"}


def aiperf_command(exe: Path, url: str, model: str, tokenizer: Path, dataset: Path, concurrency: int,
                   requests: int, warmup: int, artifact_dir: Path, extra: dict[str, Any]) -> list[str]:
    """`aiperf profile` for one (dataset, concurrency) cell: chat endpoint, streaming, server token counts,
    no UI / server metrics / GPU telemetry (nothing to scrape here, and less load on the shared cores)."""
    return [str(exe), "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", str(tokenizer), "--input-file", str(dataset), "--custom-dataset-type", "single_turn",
            "--concurrency", str(concurrency), "--request-count", str(requests),
            "--warmup-request-count", str(warmup), "--extra-inputs", json.dumps(extra),
            "--use-server-token-count", "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
            "--workers-max", "1", "--random-seed", "0", "--output-artifact-dir", str(artifact_dir)]


def _stat(metrics: dict[str, Any], name: str, key: str) -> float | None:
    v = (metrics.get(name) or {}).get(key)
    return float(v) if isinstance(v, int | float) else None


def parse_export(path: Path) -> dict[str, Any]:
    """AIPerf's `profile_export_aiperf.json` → our names (ms, requests/s, tokens/s)."""
    m = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {"aiperf_version": m.get("aiperf_version"),
                           "requests": _stat(m, "request_count", "avg"),
                           "error_rate_pct": _stat(m, "request_error_rate", "avg") or 0.0,
                           "request_throughput_rps": _stat(m, "request_throughput", "avg"),
                           "output_token_throughput_tps": _stat(m, "output_token_throughput", "avg"),
                           "prompt_tokens_mean": _stat(m, "input_sequence_length", "avg"),
                           "completion_tokens_mean": _stat(m, "output_sequence_length", "avg"),
                           "benchmark_duration_s": _stat(m, "benchmark_duration", "avg"),
                           # socket reads per response: far below the token count means AIPerf's worker read
                           # a backlog at once (it was not scheduled), so its TTFT is late and its ITL short
                           "chunks_received_mean": _stat(m, "http_req_chunks_received", "avg")}
    for ours, theirs in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency"),
                         ("e2e", "request_latency")):
        for p in ("p50", "p90", "p99", "avg"):
            out[f"{ours}_{p}_ms"] = _stat(m, theirs, p)
    return out


def run_aiperf(cmd: list[str], artifact_dir: Path) -> dict[str, Any]:
    """Run one `aiperf profile` and parse its export; AIPerfUnavailable with its log tail on failure."""
    shutil.rmtree(artifact_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as e:
        raise AIPerfUnavailable(f"aiperf profile ran longer than {RUN_TIMEOUT_S:.0f} s") from e
    export = artifact_dir / "profile_export_aiperf.json"
    if proc.returncode != 0 or not export.is_file():
        raise AIPerfUnavailable(f"aiperf profile failed (exit {proc.returncode}): {_tail(proc.stdout + proc.stderr)}")
    # CPU of AIPerf and every process it started and reaped (start-up included), on the cores the server uses
    return {**parse_export(export), "wall_s": round(time.perf_counter() - t0, 1),
            "client_cpu_s": round(_children_cpu_s() - cpu0, 2), "artifacts": str(artifact_dir)}


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def own_summary(records: Any) -> dict[str, Any]:
    """Our LoadResult → the compared numbers (same names as `parse_export`)."""
    s = records.summary()
    return {"requests": s["requests"], "errors": s["errors"], "request_throughput_rps": s["request_throughput_rps"],
            "output_token_throughput_tps": s["output_token_throughput_tps"],
            "prompt_tokens_mean": s["prompt_tokens_mean"], "completion_tokens_mean": s["completion_tokens_mean"],
            **{f"{k}_{p}_ms": s[f"{k}_ms"][p] for k in ("ttft", "itl", "e2e") for p in ("p50", "p90", "p99")}}


def agreement(aiperf: dict[str, Any], own: list[dict[str, Any]]) -> dict[str, Any]:
    """Per compared metric: AIPerf's value, our mean of the two runs, the tolerance and |difference| / tolerance
    (≤ 1 agrees). The target value is the worst ratio."""
    rows: dict[str, Any] = {}
    worst = 0.0
    for key, _label in COMPARED:
        a = aiperf.get(key)
        vals = [o[key] for o in own if o.get(key) is not None]
        if a is None or not vals:
            rows[key] = {"aiperf": a, "ours": None, "tolerance": None, "ratio": None}
            worst = float("inf")
            continue
        ours = sum(vals) / len(vals)
        spread = max(vals) - min(vals)
        tol = max(REL_TOLERANCE * abs(ours), NOISE_FACTOR * spread, 1e-9)
        ratio = abs(a - ours) / tol
        rows[key] = {"aiperf": a, "ours": ours, "ours_runs": vals, "tolerance": tol, "ratio": ratio}
        worst = max(worst, ratio)
    return {"by_metric": rows, "worst_ratio": worst}


async def _own_run(url: str, model: str, w: Workload, concurrency: int, n: int, plan: Plan) -> dict[str, Any]:
    client = RawSSEClient(url, model)
    try:
        for _ in range(plan.warmup):
            r = await client.send(w)
            if not r.ok:
                raise RuntimeError(f"warm-up {w.name} request failed: {r.error}")
        cpu0 = time.process_time()
        res = await closed_loop(lambda i: client.send(w), concurrency, n, plan.loop_time_s)
        cpu = time.process_time() - cpu0
    finally:
        await client.close()
    return {**own_summary(res), "client_cpu_s": round(cpu, 2), "wall_s": round(res.wall_s, 2)}


def compare(openai_url: str, model: str, tokenizer: Path, exe: Path, plan: Plan,
            workloads: tuple[str, ...] = WORKLOADS, concurrencies: tuple[int, ...] = CONCURRENCIES,
            work: Path = WORK_DIR / "aiperf") -> dict[str, Any]:
    """Every (workload, concurrency) cell A-B-A: ours, AIPerf, ours. Returns the cells and the targets list."""
    url_root = openai_url.rstrip("/").removesuffix("/v1")
    all_w = build_workloads(plan.max_tokens)
    cells: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    work.mkdir(parents=True, exist_ok=True)
    for name in workloads:
        w = all_w[name]
        for c in concurrencies:
            n = plan.requests(name, c)
            dataset = work / f"{name}.jsonl"
            dataset.write_text("\n".join(dataset_lines(w, n + plan.warmup, plan.max_tokens)) + "\n")
            cmd = aiperf_command(exe, url_root, model, tokenizer, dataset, c, n, plan.warmup,
                                 work / f"{name}-c{c}", extra_inputs(w))
            own1 = asyncio.run(_own_run(openai_url, model, w, c, n, plan))
            theirs = run_aiperf(cmd, work / f"{name}-c{c}")
            own2 = asyncio.run(_own_run(openai_url, model, w, c, n, plan))
            agree = agreement(theirs, [own1, own2])
            cell = {"workload": name, "concurrency": c, "requests": n, "aiperf": theirs, "ours": [own1, own2],
                    "agreement": agree, "aiperf_command": cmd}
            cells.append(cell)
            detail = "; ".join(
                f"{label} aiperf {_f(agree['by_metric'][k]['aiperf'])} vs ours {_f(agree['by_metric'][k]['ours'])} "
                f"(runs {', '.join(_f(v) for v in agree['by_metric'][k].get('ours_runs', []))}; tol "
                f"{_f(agree['by_metric'][k]['tolerance'])})" for k, label in COMPARED)
            errors = (theirs.get("error_rate_pct") or 0.0) > 0 or own1["errors"] or own2["errors"]
            targets.append({"name": f"AIPerf agrees with our harness, {name}, c={c}",
                            "value": agree["worst_ratio"], "goal": "<= 1 (|diff| / tolerance, every metric)",
                            "pass": bool(agree["worst_ratio"] <= 1.0 and not errors),
                            "detail": f"{detail}; prompt tokens aiperf {_f(theirs.get('prompt_tokens_mean'))} vs ours "
                                      f"{_f(own1.get('prompt_tokens_mean'))}; AIPerf socket reads per response "
                                      f"{_f(theirs.get('chunks_received_mean'))} for "
                                      f"{_f(theirs.get('completion_tokens_mean'))} tokens; client CPU aiperf "
                                      f"{_f(theirs.get('client_cpu_s'))} s (start-up included, {_f(theirs.get('wall_s'))} s "
                                      f"wall) vs ours {_f(own1.get('client_cpu_s'))} s; {n} requests"
                                      + ("; ERRORS in a run" if errors else "")})
            print(f"[aiperf] {name} c={c}: {'PASS' if targets[-1]['pass'] else 'FAIL'} {detail}", flush=True)
    return {"cells": cells, "targets": targets}


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def run(quick: bool = False) -> dict[str, Any]:
    """Install AIPerf (own venv), start the cpu stack, compare every cell, stop the stack. When AIPerf cannot
    be installed or run, the result says why in "error" and in one failing target."""
    from benchmarks import stack
    from nemovl_trt.triton.launcher import TritonServer

    plan = QUICK if quick else Plan()
    try:
        exe = setup_aiperf()
    except AIPerfUnavailable as e:
        return {"error": str(e), "targets": [{"name": "AIPerf installed in its own venv", "value": 0.0,
                                              "goal": f"{AIPERF_SPEC} in {AIPERF_VENV}", "pass": False,
                                              "detail": str(e)}]}
    info = stack.build()
    triton = TritonServer(info.repo, engines_dir=info.engines, log_path=WORK_DIR / "tritonserver-aiperf.log").start()
    try:
        with stack.Frontend(triton.grpc_url) as fe:
            try:
                out = compare(fe.base_url, DEFAULT_MODEL, info.engines / "tokenizer", exe, plan,
                              workloads=("text",) if quick else WORKLOADS)
            except AIPerfUnavailable as e:
                return {"error": str(e), "targets": [{"name": "AIPerf profile runs against nemovl serve",
                                                      "value": 0.0, "goal": "exit 0 with an export", "pass": False,
                                                      "detail": str(e)}]}
    finally:
        triton.stop()
    return {"aiperf": {"spec": AIPERF_SPEC, "venv": str(AIPERF_VENV), "version": installed_version()},
            "plan": plan.__dict__, "tolerance": {"relative": REL_TOLERANCE, "noise_factor": NOISE_FACTOR},
            "stack": info.to_dict(), **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="text only, a few requests per cell (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "aiperf.json")
    args = ap.parse_args(argv)
    result = {"benchmark": "aiperf", "time": utc_now(), "machine": machine_info(), **run(quick=args.quick)}
    write_json(args.out, result)
    print_targets(result["targets"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
