"""Fault-tolerance benchmarks of `nemovl serve --repo` on the cpu target (127.0.0.1 only, bounded loops):

1. recovery time after `kill -9` of the `llm` Python-backend stub and of tritonserver itself: from the kill
   to `/v1/health/ready` 200 *and* a served chat request (n = 5 each; p50 reported);
2. latency under a burst of 64 concurrent chat requests (16 tokens, ignore_eos) with the bounded queue
   (`--max-concurrent 8 --max-queue 16`: the rest get 429) and without (`--max-concurrent 64 --max-queue 1000`):
   p50 / p95 of the served requests, the 429 count and how fast a 429 comes back;
3. rejection time of an 8 MB text prompt (client round trip, keep-alive; goal < 50 ms).

`python -m benchmarks.faults_bench [--repeats 5] [--out benchmarks/results/faults.json]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS_DIR, machine_info, summarize, utc_now, write_json
from benchmarks.stack import ServeProcess, build

MODEL = "nvidia/nemotron-nano-12b-v2-vl"


class Serve(ServeProcess):
    def __init__(self, repo: Path, args: list[str]) -> None:
        super().__init__(repo, args, "faults")

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    if c.get(self.url + "/v1/health/ready").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        return False

    def pids(self) -> tuple[int, dict[str, int]]:
        """(tritonserver pid, {model: stub pid}) of this server."""
        from nemovl_trt.triton.launcher import group_pids, proc_stats, stub_info

        assert self.proc is not None
        for pid, fields in proc_stats():
            if fields[1] != str(self.proc.pid):
                continue
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if argv0.endswith(b"tritonserver"):
                ts = pid
                stubs = {}
                for p in group_pids(ts):
                    info = stub_info(p) if p != ts else None
                    if info:
                        stubs[info.model] = p
                return ts, stubs
        raise RuntimeError("no tritonserver found")


def chat(max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": max_tokens, **kw}


def recovery(serve: Serve, target: str, repeats: int) -> dict[str, Any]:
    times = []
    with httpx.Client(timeout=30) as c:
        for _ in range(repeats):
            assert serve.wait_ready(120)
            ts, stubs = serve.pids()
            pid = ts if target == "tritonserver" else stubs[target]
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            down_by = time.monotonic() + 10  # first see the failure noticed (503), then the recovery
            while time.monotonic() < down_by and c.get(serve.url + "/v1/health/ready").status_code == 200:
                time.sleep(0.01)
            served = False
            deadline = time.monotonic() + 120
            while not served and time.monotonic() < deadline:
                if serve.wait_ready(deadline - time.monotonic()):
                    served = c.post(serve.url + "/v1/chat/completions", json=chat(4)).status_code == 200
                if not served:
                    time.sleep(0.05)
            times.append(time.monotonic() - t0 if served else float("nan"))
            time.sleep(1.0)
    return {"target": target, "seconds": [round(t, 3) for t in times], **summarize(times)}


def burst(serve: Serve, n: int = 64) -> dict[str, Any]:
    async def one(c: httpx.AsyncClient) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = await c.post(serve.url + "/v1/chat/completions", json=chat(16, ignore_eos=True))
        return r.status_code, time.perf_counter() - t0

    async def go() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n)) as c:
            await c.get(serve.url + "/v1/health/live")
            return await asyncio.gather(*(one(c) for _ in range(n)))

    t0 = time.perf_counter()
    res = asyncio.run(go())
    wall = time.perf_counter() - t0
    ok = [t for s, t in res if s == 200]
    rejected = [t for s, t in res if s == 429]
    return {"requests": n, "served": len(ok), "rejected_429": len(rejected),
            "other": sorted({s for s, _ in res} - {200, 429}), "wall_s": round(wall, 2),
            "served_latency_ms": summarize(ok, 1e3), "rejection_latency_ms": summarize(rejected, 1e3),
            "p95_served_ms": float(_p(ok, 95) * 1e3) if ok else None}


def _p(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def long_prompt_rejection(serve: Serve, repeats: int = 10) -> dict[str, Any]:
    raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 1_600_000}]}).encode()
    times = []
    with httpx.Client(timeout=60) as c:
        c.get(serve.url + "/v1/health/live")
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = c.post(serve.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:200]
    s = summarize(times, 1e3)
    return {"body_bytes": len(raw), "rejection_ms": s, "goal_ms": 50, "pass": bool(s["p50"] is not None and s["p50"] < 50)}


def run(quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    """Every fault measurement on the cpu stack; `repeats` kills per target (default 5, quick 2)."""
    repeats = repeats or (2 if quick else 5)
    info = build()
    out: dict[str, Any] = {"benchmark": "faults", "time": utc_now(), "machine": machine_info(),
                           "command": "python -m benchmarks.faults_bench", "build": info.to_dict(), "repeats": repeats}
    load0 = os.getloadavg()[0]
    with Serve(info.repo, ["--max-concurrent", "8", "--max-queue", "16", "--max-restarts-per-minute", "30"]) as s:
        out["long_prompt"] = long_prompt_rejection(s)
        print("8 MB prompt rejection:", out["long_prompt"]["rejection_ms"], flush=True)
        out["burst_bounded"] = {"flags": "--max-concurrent 8 --max-queue 16", **burst(s)}
        print("burst, bounded:", out["burst_bounded"], flush=True)
        out["recovery_llm_stub"] = recovery(s, "llm", repeats)
        print("recovery, llm stub:", out["recovery_llm_stub"], flush=True)
        out["recovery_tritonserver"] = recovery(s, "tritonserver", repeats)
        print("recovery, tritonserver:", out["recovery_tritonserver"], flush=True)
        out["note"] = ("recovery = kill -9 → /v1/health/ready 200 and one chat request served; run with "
                       "--max-restarts-per-minute 30 so that the 2×repeats kills are not rate-limited (default 5)")
    with Serve(info.repo, ["--max-concurrent", "64", "--max-queue", "1000"]) as s:
        out["burst_unbounded"] = {"flags": "--max-concurrent 64 --max-queue 1000", **burst(s)}
        print("burst, unbounded:", out["burst_unbounded"], flush=True)
    out["load_average_1m"] = {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)}
    lp = out["long_prompt"]
    out["targets"] = [{"name": "8 MB prompt rejected (400 context_length_exceeded)", "value": lp["rejection_ms"]["p50"],
                       "goal": "< 50 ms p50", "pass": lp["pass"],
                       "detail": f"p99 {lp['rejection_ms'].get('p99')} ms over {lp['rejection_ms'].get('n')} requests"}]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "faults.json")
    args = ap.parse_args(argv)
    out = run(quick=args.quick, repeats=args.repeats if not args.quick else None)
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
