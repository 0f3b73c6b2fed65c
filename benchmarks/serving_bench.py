"""Serving on the cpu target: throughput, TTFT, ITL and end-to-end latency at several concurrencies
for text-only, one-image and video requests, through (a) the OpenAI endpoint (OpenAI SDK, streaming)
and (b) Triton directly (tritonclient gRPC streaming), and the frontend's added latency (a) − (b).

Both paths send the same requests (same prompt, media bytes, greedy sampling, `ignore_eos`, fixed
`max_tokens`), so they generate the same number of tokens. At concurrency 1 the paths take turns
request by request (the order rotates) so that load drift from other processes hits all alike, and a
third path (a') sends the same HTTP requests from plain httpx, to tell the OpenAI SDK's own client
cost from the frontend's; at higher concurrency each path runs its own closed loop, (b) first.

The frontend-overhead goal (≤ 2 ms per request at p50, ≤ 0.2 ms per streamed token) is judged on the plain
httpx client (a'), the cheapest HTTP client, so that the number is the frontend's cost and not the client
library's; the OpenAI SDK figure is the second row (it adds the SDK's own parsing, ~5 ms here). When the
frontend's process id is known, its CPU time per request at concurrency 1 is recorded as well: on a shared
2-core machine every CPU millisecond of the frontend is taken from the engine, and unlike latency it barely
moves with the load from other processes.

Run alone against a running stack:
`python -m benchmarks.serving_bench --openai http://127.0.0.1:8000/v1 --triton 127.0.0.1:8001`;
or with a stack of its own (benchmarks/stack.py): `python -m benchmarks.serving_bench [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.clients import OpenAIClient, RawSSEClient, TritonClient, Workload
from benchmarks.common import (
    RESULTS_DIR,
    machine_info,
    make_jpeg,
    make_mp4,
    print_targets,
    summarize,
    utc_now,
    write_json,
)
from benchmarks.loadgen import LoadResult, closed_loop

CONCURRENCIES = (1, 4, 16)
TARGET_OVERHEAD_P50_MS = 2.0  # issue 8: frontend overhead per request, p50
TARGET_OVERHEAD_PER_TOKEN_MS = 0.2  # issue 8: frontend overhead per streamed token
IMAGE = {"width": 1024, "height": 512}  # 2×1 tiles + thumbnail at the default max_num_tiles → 768 tokens
VIDEO = {"width": 320, "height": 240, "fps": 8, "num_frames": 32}  # a 4 s clip
VIDEO_FRAMES = 4  # num_frames sampled per request → 4 tiles → 1024 video tokens


@dataclass(frozen=True)
class Budget:
    """Request counts and a wall-clock cap per closed loop (no request starts after `loop_time_s`; the
    ones in flight finish). Image and video requests cost ~10× a text request on the cpu target (the
    vision encoder runs on the same 2 cores), so they get their own, smaller counts."""

    rounds_c1: int = 40  # text: rounds (one request per path) at concurrency 1
    requests_per_slot: int = 3  # text: requests per path at concurrency c = max(min_requests, slots · c)
    min_requests: int = 16
    media_rounds_c1: int = 16  # image / video
    media_requests_per_slot: int = 1
    media_min_requests: int = 8
    loop_time_s: float = 12.0
    max_tokens: int = 32

    def counts(self, workload: str) -> tuple[int, int, int]:
        """(rounds at c=1, requests per slot, minimum requests) for `workload`."""
        if workload == "text":
            return self.rounds_c1, self.requests_per_slot, self.min_requests
        return self.media_rounds_c1, self.media_requests_per_slot, self.media_min_requests


QUICK = Budget(rounds_c1=4, requests_per_slot=1, min_requests=4, media_rounds_c1=2, media_requests_per_slot=1,
               media_min_requests=2, loop_time_s=3.0, max_tokens=8)


def build_workloads(max_tokens: int) -> dict[str, Workload]:
    """The three request shapes: text-only, one image (JPEG), one video (H.264 MP4)."""
    params = {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0, "ignore_eos": True}
    image = make_jpeg(**IMAGE)
    video = make_mp4(**VIDEO)
    return {
        "text": Workload(name="text", prompt="Write a short story about a robot who learns to paint.",
                         params=params),
        "image": Workload(name="image", prompt="Describe this image in detail.", images=(image,),
                          params=params),
        "video": Workload(name="video", prompt="Describe what happens in this video.", video=video,
                          params={**params, "num_frames": VIDEO_FRAMES}),
    }


def _diff(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, float | None]:
    """(a) − (b) of a latency summary at p50 and p99 (ms)."""
    out: dict[str, float | None] = {}
    for p in ("p50", "p99"):
        va, vb = a[key][p], b[key][p]
        out[p] = (va - vb) if va is not None and vb is not None else None
    return out


def paired_overhead(a: LoadResult, b: LoadResult, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Round-by-round differences (a_i − b_i) at concurrency 1: median and a 95 % bootstrap interval of the
    median (ms), for e2e, TTFT and per-token latency. The interval shows how much of the difference is
    noise from the shared machine."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    pairs = [(x, y) for x, y in zip(a.records, b.records, strict=False) if x.ok and y.ok]
    for key, get in (("e2e_ms", lambda r: r.e2e_s), ("ttft_ms", lambda r: r.ttft_s),
                     ("per_token_ms", lambda r: r.itl_s)):
        d = np.array([(get(x) - get(y)) * 1e3 for x, y in pairs if get(x) is not None and get(y) is not None])
        if d.size == 0:
            out[key] = {"n": 0, "median": None, "ci95": None}
            continue
        boots = np.median(rng.choice(d, size=(resamples, d.size), replace=True), axis=1)
        out[key] = {"n": int(d.size), "median": float(np.median(d)),
                    "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}
    return out


def overhead(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Frontend added latency: per request (e2e and TTFT) and per streamed token (ITL), ms."""
    return {"e2e_ms": _diff(a, b, "e2e_ms"), "ttft_ms": _diff(a, b, "ttft_ms"),
            "per_token_ms": _diff(a, b, "itl_ms")}


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds used so far by process `pid`, all its threads; None when unreadable.

    The sum of the threads' `/proc/PID/task/*/schedstat` run times (nanoseconds) when the kernel has them:
    `/proc/PID/stat` counts in clock ticks (10 ms), too coarse for a few requests of ~12 ms. Threads that
    exited are not in that sum (the frontend's threads live as long as it does); the two sources are never
    mixed, a difference of readings would mean nothing."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return _stat_cpu_s(pid)
    run_ns = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                run_ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile, or no schedstats in this kernel
    return run_ns / 1e9 if run_ns else _stat_cpu_s(pid)


def _stat_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of `pid` from /proc/PID/stat (clock ticks); None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _interleaved_c1(clients: dict[str, Any], w: Workload, rounds: int,
                          time_budget_s: float) -> dict[str, LoadResult]:
    """Concurrency 1 with the paths taking turns request by request (the order rotates every round)."""
    names = list(clients)
    recs: dict[str, list[Any]] = {n: [] for n in names}
    deadline = time.perf_counter() + time_budget_s
    for i in range(rounds):
        if time.perf_counter() >= deadline:
            break
        k = i % len(names)
        order = names[k:] + names[:k]
        if (i // len(names)) % 2:
            order.reverse()
        for n in order:
            recs[n].append(await clients[n].send(w))
    return {n: LoadResult(1, r, sum(x.e2e_s for x in r)) for n, r in recs.items()}


async def http_floor(openai_url: str, n: int = 40) -> dict[str, Any]:
    """Round trip of the cheapest frontend route (GET /health) from plain httpx, ms: the cost of one
    HTTP hop through uvicorn on this machine, a floor under any per-request overhead."""
    import httpx

    root = openai_url.rstrip("/").rsplit("/v1", 1)[0]
    times = []
    async with httpx.AsyncClient(trust_env=False) as client:
        for _ in range(n + 5):
            t0 = time.perf_counter()
            await client.get(f"{root}/health")
            times.append(time.perf_counter() - t0)
    return summarize(times[5:], 1e3)


async def _bench_async(openai_url: str, model: str, triton_url: str, concurrencies: tuple[int, ...],
                       workload_names: tuple[str, ...], budget: Budget, with_raw_sse: bool,
                       frontend_pid: int | None = None) -> dict[str, Any]:
    workloads = build_workloads(budget.max_tokens)
    oa = OpenAIClient(openai_url, model)
    tr = TritonClient(triton_url)
    raw = RawSSEClient(openai_url, model) if with_raw_sse else None
    runs: list[dict[str, Any]] = []
    floor = await http_floor(openai_url)
    try:
        for name in workload_names:
            w = workloads[name]
            for client in (tr, oa, *([raw] if raw is not None else [])):  # warm-up: first-request costs stay out of the numbers
                r = await client.send(w)
                if not r.ok:
                    raise RuntimeError(f"warm-up {name} request via {type(client).__name__} failed: {r.error}")
            rounds_c1, per_slot, min_requests = budget.counts(name)
            for c in concurrencies:
                extra: dict[str, Any] = {}
                if c == 1:
                    paths = {"openai": oa, "triton": tr, **({"raw_sse": raw} if raw is not None else {})}
                    cpu0 = process_cpu_s(frontend_pid) if frontend_pid else None
                    res = await _interleaved_c1(paths, w, rounds_c1, budget.loop_time_s * len(paths))
                    cpu1 = process_cpu_s(frontend_pid) if frontend_pid else None
                    res_a, res_b = res["openai"], res["triton"]
                    extra = {"paired_overhead": paired_overhead(res_a, res_b)}
                    through_frontend = sum(len(res[k].records) for k in res if k != "triton")
                    if cpu0 is not None and cpu1 is not None and through_frontend:
                        extra["frontend_cpu_ms_per_request"] = (cpu1 - cpu0) * 1e3 / through_frontend
                    if "raw_sse" in res:
                        s_raw = res["raw_sse"].summary()
                        extra.update(raw_sse=s_raw, frontend_overhead_raw_sse=overhead(s_raw, res_b.summary()),
                                     paired_overhead_raw_sse=paired_overhead(res["raw_sse"], res_b))
                else:
                    n = max(min_requests, per_slot * c)
                    res_b = await closed_loop(lambda i, w=w: tr.send(w), c, n, budget.loop_time_s)
                    res_a = await closed_loop(lambda i, w=w: oa.send(w), c, n, budget.loop_time_s)
                sa, sb = res_a.summary(), res_b.summary()
                row = {"workload": name, "concurrency": c, "openai": sa, "triton": sb,
                       "frontend_overhead": overhead(sa, sb), **extra}
                runs.append(row)
                print(f"[serving] {name:5s} c={c:<2d} "
                      f"rps a={sa['request_throughput_rps']:.2f} b={sb['request_throughput_rps']:.2f}  "
                      f"ttft p50 a={_fmt(sa['ttft_ms']['p50'])} b={_fmt(sb['ttft_ms']['p50'])} ms  "
                      f"e2e p50 a={_fmt(sa['e2e_ms']['p50'])} b={_fmt(sb['e2e_ms']['p50'])} ms  "
                      f"errors a={sa['errors']} b={sb['errors']}", flush=True)
    finally:
        await oa.close()
        await tr.close()
        if raw is not None:
            await raw.close()
    return {"http_floor_ms": floor, "runs": runs, "targets": evaluate_targets(runs),
            "frontend": {"targets": frontend_targets(runs, floor)}}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def evaluate_targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """PASS/FAIL of the issue's targets, judged at concurrency 1 per workload (the frontend's own cost,
    not queueing); the headline is text-only."""
    checks: dict[str, Any] = {}
    for row in runs:
        if row["concurrency"] != 1:
            continue
        ov = row["frontend_overhead"]
        per_req, per_tok = ov["e2e_ms"]["p50"], ov["per_token_ms"]["p50"]
        checks[row["workload"]] = {
            "overhead_p50_ms": per_req, "overhead_p99_ms": ov["e2e_ms"]["p99"],
            "per_token_p50_ms": per_tok, "per_token_p99_ms": ov["per_token_ms"]["p99"],
            "paired_median_ms": (row.get("paired_overhead") or {}).get("e2e_ms", {}).get("median"),
            "paired_ci95_ms": (row.get("paired_overhead") or {}).get("e2e_ms", {}).get("ci95"),
            "raw_sse_overhead_p50_ms": (row.get("frontend_overhead_raw_sse") or {}).get("e2e_ms", {}).get("p50"),
            "raw_sse_per_token_p50_ms": (row.get("frontend_overhead_raw_sse") or {}).get("per_token_ms", {}).get("p50"),
            "request_pass": per_req is not None and per_req <= TARGET_OVERHEAD_P50_MS,
            "token_pass": per_tok is not None and per_tok <= TARGET_OVERHEAD_PER_TOKEN_MS,
        }
    return {"overhead_p50_ms_max": TARGET_OVERHEAD_P50_MS,
            "per_token_ms_max": TARGET_OVERHEAD_PER_TOKEN_MS, "by_workload": checks}


def _num(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def frontend_targets(runs: list[dict[str, Any]], floor: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's goals as a targets list, at concurrency 1 per workload: per-request overhead p50 with the
    plain httpx client (the goal) and with the OpenAI SDK (second row: its goal is the same, but it includes
    the SDK's client-side cost), and per streamed token; each detail has both paths' p50s and the paired
    median with its 95 % interval (the noise of the shared machine)."""
    out: list[dict[str, Any]] = []
    floor_p50 = (floor or {}).get("p50")
    for row in runs:
        if row["concurrency"] != 1:
            continue
        w, tb = row["workload"], row["triton"]
        cpu = row.get("frontend_cpu_ms_per_request")
        common = (f"Triton direct e2e p50 {_num(tb['e2e_ms']['p50'])} ms; frontend CPU "
                  f"{_num(cpu)} ms/request; GET /health round trip p50 {_num(floor_p50)} ms")
        for client, ov_key, paired_key, summary_key in (
                ("plain httpx", "frontend_overhead_raw_sse", "paired_overhead_raw_sse", "raw_sse"),
                ("OpenAI SDK", "frontend_overhead", "paired_overhead", "openai")):
            ov, paired, sa = row.get(ov_key), row.get(paired_key) or {}, row.get(summary_key)
            if not ov or not sa:
                continue
            v = ov["e2e_ms"]["p50"]
            pe = paired.get("e2e_ms") or {}
            ci = pe.get("ci95") or [None, None]
            out.append({"name": f"frontend overhead per request, {w}, c=1, {client} client",
                        "value": v, "goal": f"<= {TARGET_OVERHEAD_P50_MS:g} ms (p50)",
                        "pass": v is not None and v <= TARGET_OVERHEAD_P50_MS,
                        "detail": f"e2e p50 {_num(sa['e2e_ms']['p50'])} ms vs {common}; paired median "
                                  f"{_num(pe.get('median'))} ms, 95% CI [{_num(ci[0])}, {_num(ci[1])}], "
                                  f"n={pe.get('n')}; TTFT p50 diff {_num(ov['ttft_ms']['p50'])} ms"})
            if client == "plain httpx":
                t = ov["per_token_ms"]["p50"]
                out.append({"name": f"frontend overhead per streamed token, {w}, c=1, {client} client",
                            "value": t, "goal": f"<= {TARGET_OVERHEAD_PER_TOKEN_MS:g} ms (p50)",
                            "pass": t is not None and t <= TARGET_OVERHEAD_PER_TOKEN_MS,
                            "detail": f"ITL p50 {_num(sa['itl_ms']['p50'], 3)} ms vs Triton direct "
                                      f"{_num(tb['itl_ms']['p50'], 3)} ms"})
    return out


def bench_serving(openai_url: str, model: str, triton_url: str,
                  concurrencies: tuple[int, ...] = CONCURRENCIES,
                  workload_names: tuple[str, ...] = ("text", "image", "video"),
                  budget: Budget | None = None, with_raw_sse: bool = True,
                  frontend_pid: int | None = None) -> dict[str, Any]:
    """Run every (workload, concurrency) on both paths; returns runs, overheads and target checks.

    With `with_raw_sse`, concurrency 1 also runs a third path — the same HTTP requests from plain httpx
    (RawSSEClient) — to separate the OpenAI SDK's client-side cost from the frontend's. With
    `frontend_pid` (a local frontend), its CPU ms per request at concurrency 1 are recorded too.
    """
    budget = budget or Budget()
    out = asyncio.run(_bench_async(openai_url, model, triton_url, concurrencies, workload_names, budget,
                                   with_raw_sse, frontend_pid))
    return {"budget": budget.__dict__, "image": {**IMAGE, "format": "jpeg"},
            "video": {**VIDEO, "codec": "h264", "sampled_frames": VIDEO_FRAMES}, **out}


def profile_summary(raw_path: Path, top: int = 20) -> dict[str, Any]:
    """A py-spy `--format raw` file (collapsed stacks, `frame;frame;... count`) → the `top` frames by self time,
    as shares of all samples, line numbers dropped."""
    import re

    counts: dict[str, int] = {}
    total = 0
    for line in raw_path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1])
        counts[leaf] = counts.get(leaf, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return {"samples": total, "self_time_share": [{"frame": k, "share": v / total} for k, v in ranked] if total else []}


def _start_py_spy(exe: str, pid: int, out: Path) -> Any:
    """`py-spy record` on `pid` (samples holding the GIL, 1 kHz, raw collapsed stacks) until stopped."""
    import subprocess

    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([exe, "record", "-p", str(pid), "--gil", "-r", "1000", "-f", "raw", "-o", str(out),
                             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(quick: bool = False, py_spy: str | None = None) -> dict[str, Any]:
    """Build (or reuse) the cpu stack (benchmarks/stack.py), start tritonserver + `nemovl serve --triton`, run
    every workload at concurrency 1, 4, 16 (quick: text only, c=1 and 2, tiny counts) and stop the stack.
    The "targets" list is the frontend-overhead goals (`frontend_targets`); the issue-8 dict stays under
    "targets_by_workload". With `py_spy` (the py-spy executable) the frontend is profiled during the whole
    run: benchmarks/results/serving_frontend.pyspy.txt and a self-time summary under "frontend_profile"."""
    from benchmarks import stack
    from nemovl_trt.triton.launcher import TritonServer

    info = stack.build()
    triton = TritonServer(info.repo, engines_dir=info.engines, log_path=stack.WORK_DIR / "tritonserver.log").start()
    try:
        with stack.Frontend(triton.grpc_url) as fe:
            assert fe.proc is not None
            prof_path = RESULTS_DIR / "serving_frontend.pyspy.txt"
            spy = _start_py_spy(py_spy, fe.proc.pid, prof_path) if py_spy else None
            try:
                out = bench_serving(fe.base_url, DEFAULT_MODEL, triton.grpc_url,
                                    concurrencies=(1, 2) if quick else CONCURRENCIES,
                                    workload_names=("text",) if quick else ("text", "image", "video"),
                                    budget=QUICK if quick else None, frontend_pid=fe.proc.pid)
            finally:
                if spy is not None:
                    import signal

                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
                    spy.wait(60)
            if spy is not None and prof_path.is_file():
                out["frontend_profile"] = {"file": str(prof_path), **profile_summary(prof_path)}
    finally:
        triton.stop()
    by_workload = out.pop("targets")
    return {"stack": info.to_dict(), **out, "targets": out["frontend"]["targets"],
            "targets_by_workload": by_workload}


DEFAULT_MODEL = "nvidia/nemotron-nano-12b-v2-vl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openai", help="base URL of a running frontend, e.g. http://127.0.0.1:8000/v1 "
                                     "(default: start a stack of its own)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--triton", help="HOST:PORT of Triton's gRPC endpoint (with --openai)")
    ap.add_argument("--frontend-pid", type=int, help="pid of the frontend at --openai, for its CPU per request")
    ap.add_argument("--quick", action="store_true", help="tiny request counts (smoke run)")
    ap.add_argument("--py-spy", metavar="EXE", help="profile the frontend with this py-spy (own stack only)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "serving.json")
    args = ap.parse_args(argv)
    if (args.openai is None) != (args.triton is None):
        ap.error("give both --openai and --triton, or neither (a stack of its own)")
    if args.py_spy and args.openai:
        ap.error("--py-spy profiles the frontend this command starts: leave out --openai/--triton")
    if args.openai:
        out = bench_serving(args.openai, args.model, args.triton, budget=QUICK if args.quick else None,
                            frontend_pid=args.frontend_pid)
        out = {**out, "targets_by_workload": out.pop("targets"), "targets": out["frontend"]["targets"]}
    else:
        out = run(quick=args.quick, py_spy=args.py_spy)
    result = {"benchmark": "serving", "time": utc_now(), "machine": machine_info(), **out}
    write_json(args.out, result)
    print_targets(result["targets"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
