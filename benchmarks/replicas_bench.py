"""Replicas behind one frontend (`nemovl serve --repo R --replicas N`, cpu target, 127.0.0.1 only):

1. throughput at concurrency CONCURRENCY with 1 vs 2 replicas: requests/s of image questions (ignore_eos,
   TOKENS tokens each, non-streamed) through the frontend; the ratio 2/1 is reported. On a 2-core host it is
   bounded by the cores, not by the router: one replica is a pipeline of single-threaded stages (frontend,
   preprocessor, vision encoder, LLM stubs; one intra-op thread each) that keeps only part of the two cores
   busy, and a second replica can only fill the idle share of the same two cores — at most min(2, cores /
   cores busy with one replica), measured here from the CPU time of the stack's process tree, less what other
   processes take (from /proc/stat) — never add compute the way a second GPU does;
2. routing overhead per request: p50 latency of sequential 1-token text requests through the frontend over
   2 replicas minus the same through `--replicas 1` (one replica, no choice to make), measured in the same
   run; plus the in-process cost of the routing decision itself (`ReplicaSet.pick` + bookkeeping, µs).

Timings taken while other work loads the machine are noisy; the ratio and the difference are measured in
the same run against a baseline of the same run.

`python -m benchmarks.replicas_bench [--quick]` prints one `PASS|FAIL  name: detail` line per target and
writes benchmarks/results/replicas.json (the file `make bench` writes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS_DIR, WORK_DIR, machine_info, summarize, utc_now, write_json
from benchmarks.stack import ServeProcess, build
from nemovl_trt.triton.launcher import proc_stats

NAME = "replicas_bench"
MODEL = "nvidia/nemotron-nano-12b-v2-vl"
CONCURRENCY = 8
TOKENS = 16
EVAL_SEED = 4242
FULL = {"rounds": 3, "throughput_requests": 32, "latency_requests": 40, "warmup": 4}
QUICK = {"rounds": 1, "throughput_requests": 16, "latency_requests": 10, "warmup": 2}
# 2 replicas not slower than 1, within the noise of a shared host (phases of the same run vary by ~10 % there);
# the most a second replica can add on 2 cores is min(2, cores / cores busy with one), see the docstring
THROUGHPUT_GOAL = 0.9
OVERHEAD_GOAL_MS = 2.0  # routing adds at most this to the p50 (or 5 % of it, whichever is larger)
OVERHEAD_GOAL_FRACTION = 0.05
PICK_GOAL_US = 50.0  # the routing decision itself
READY_TIMEOUT_S = 240.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Serve(ServeProcess):
    """`nemovl serve --repo REPO --replicas N` in its own process group on a free port."""

    def __init__(self, repo: Path, replicas: int) -> None:
        super().__init__(repo, ["--replicas", str(replicas), "--max-concurrent", "64"], "replicas",
                         READY_TIMEOUT_S)
        self.replicas = replicas

    def cpu_seconds(self) -> float:
        """CPU time (user + system, s) used so far by `nemovl serve` and every process below it (the
        tritonservers and their Python-backend stubs)."""
        assert self.proc is not None
        stats = {pid: (int(f[1]), (int(f[11]) + int(f[12])) / CLOCK_TICKS) for pid, f in proc_stats()}
        tree, total = {self.proc.pid}, 0.0
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _cpu) in stats.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree:
            total += stats.get(pid, (0, 0.0))[1]
        return total

    def requests_per_replica(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("nemovl_replica_requests_total{"):
                name, _, value = line.rpartition(" ")
                out[name.split('replica="')[1].rstrip('"}')] = float(value)
        return out


def host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy since boot (all cores; /proc/stat, idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def image_bodies(n: int) -> list[dict[str, Any]]:
    """`n` image questions (held-out tiny-trained samples), TOKENS tokens each."""
    from nemovl_trt.demo import media_part
    from nemovl_trt.training.tasks import generate_sample

    types = ("color", "shape", "count", "read")
    bodies = []
    for i in range(n):
        s = generate_sample(types[i % len(types)], i // len(types), seed=EVAL_SEED, split="eval")
        bodies.append({"model": MODEL, "messages": s.messages(media_part(s)), "max_tokens": TOKENS,
                       "ignore_eos": True, "temperature": 0.0})
    return bodies


async def _throughput(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    statuses: list[int] = []
    latencies: list[float] = []

    async def one(c: httpx.AsyncClient, body: dict[str, Any]) -> None:
        async with sem:
            t0 = time.perf_counter()
            r = await c.post(url + "/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status_code)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, b) for b in bodies))
        wall = time.perf_counter() - t0
    ok = sum(1 for s in statuses if s == 200)
    return {"requests": len(bodies), "ok": ok, "wall_s": round(wall, 3), "requests_per_s": ok / wall,
            "latency_ms": summarize(latencies, 1e3)}


def _sequential(url: str, n: int) -> list[float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    times = []
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/chat/completions", json=body)
            times.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"a latency request failed: {r.status_code} {r.text[:200]}")
    return times


def throughput_phase(s: Serve, n_requests: int) -> dict[str, Any]:
    """One throughput measurement at CONCURRENCY on `s`, with the CPU the stack and the rest of the host used."""
    before, cpu0, host0 = s.requests_per_replica(), s.cpu_seconds(), host_busy_seconds()
    thr = asyncio.run(_throughput(s.url, image_bodies(n_requests), CONCURRENCY))
    after, cpu1, host1 = s.requests_per_replica(), s.cpu_seconds(), host_busy_seconds()
    thr["busy_cores"] = round((cpu1 - cpu0) / thr["wall_s"], 3)  # CPU time of the whole stack / wall time
    # cores the rest of the host (the benchmark client, other work) kept busy meanwhile
    thr["other_busy_cores"] = round(max(0.0, (host1 - host0) - (cpu1 - cpu0)) / thr["wall_s"], 3)
    thr["per_replica"] = {u: after[u] - before.get(u, 0.0) for u in after}
    print(f"[replicas] --replicas {s.replicas}: {thr['requests_per_s']:.2f} req/s at concurrency {CONCURRENCY} "
          f"({thr['ok']}/{thr['requests']} ok, per replica {thr['per_replica']}, stack {thr['busy_cores']} cores "
          f"busy, other processes {thr['other_busy_cores']})", flush=True)
    return thr


def measure(repo: Path, budget: dict[str, int]) -> dict[str, Any]:
    """`nemovl serve --replicas 1` and `--replicas 2` side by side (the idle one costs next to nothing), measured
    in alternating rounds so that a change of the host's load between phases does not bias the ratio; the
    sequential latency requests alternate between the two one by one."""
    with Serve(repo, 1) as one, Serve(repo, 2) as two:
        for s in (one, two):
            asyncio.run(_throughput(s.url, image_bodies(budget["warmup"]), CONCURRENCY))
            _sequential(s.url, budget["warmup"])
        rounds: list[dict[str, Any]] = []
        for r in range(budget["rounds"]):
            order = (one, two) if r % 2 == 0 else (two, one)
            res = {s.replicas: throughput_phase(s, budget["throughput_requests"]) for s in order}
            rounds.append({"one": res[1], "two": res[2],
                           "ratio": res[2]["requests_per_s"] / res[1]["requests_per_s"]})
        lat1: list[float] = []
        lat2: list[float] = []
        for _ in range(budget["latency_requests"]):
            lat1 += _sequential(one.url, 1)
            lat2 += _sequential(two.url, 1)
    return {"rounds": rounds, "latency_one_ms": summarize(lat1, 1e3), "latency_two_ms": summarize(lat2, 1e3)}


def pick_cost_us(iterations: int) -> dict[str, Any]:
    """p50 of one routing decision with its bookkeeping (pick + in-flight/request counters), in µs."""
    from nemovl_trt.server.replicas import HealthPolicy, ReplicaSet

    async def go() -> list[float]:
        async def probe(_r: object) -> bool:
            return True

        rs = ReplicaSet(["127.0.0.1:1", "127.0.0.1:2"], probe, connect=lambda url: None,
                        policy=HealthPolicy(interval_s=3600))
        rs.started()
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            r = rs.pick()
            r.in_flight += 1
            r.requests += 1
            r.in_flight -= 1
            times.append(time.perf_counter() - t0)
        await rs.close()
        return times

    return summarize(asyncio.run(go()), 1e6)


def run(quick: bool = False) -> dict[str, Any]:
    """Build the cpu stack, measure 1 and 2 replicas; returns the result dict with its "targets"."""
    import statistics

    budget = QUICK if quick else FULL
    info = build(WORK_DIR / "replicas")
    load0 = os.getloadavg()[0]
    m = measure(info.repo, budget)
    pick = pick_cost_us(2000 if quick else 20000)
    rounds = m["rounds"]
    ratio = statistics.median(r["ratio"] for r in rounds)
    p50_1, p50_2 = m["latency_one_ms"]["p50"], m["latency_two_ms"]["p50"]
    overhead = p50_2 - p50_1
    allowed = max(OVERHEAD_GOAL_MS, OVERHEAD_GOAL_FRACTION * p50_1)
    both = all(min(r["two"]["per_replica"].values()) > 0 for r in rounds)
    ok_all = all(r[k]["ok"] == r[k]["requests"] for r in rounds for k in ("one", "two"))
    cores = os.cpu_count() or 1
    busy1 = statistics.median(r["one"]["busy_cores"] for r in rounds)
    busy2 = statistics.median(r["two"]["busy_cores"] for r in rounds)
    other = statistics.median(r["one"]["other_busy_cores"] for r in rounds)
    # what a second replica can add on this host: its cores over the cores one replica keeps busy (less still
    # while other processes — the benchmark client, other work — take a share of them)
    bound = min(2.0, cores / busy1) if busy1 > 0 else 2.0
    per_round = "; ".join(f"{r['two']['requests_per_s']:.2f}/{r['one']['requests_per_s']:.2f} req/s"
                          for r in rounds)
    targets = [
        {"name": "throughput_2_vs_1_replicas", "value": round(ratio, 3),
         "goal": f">= {THROUGHPUT_GOAL} (2 replicas not slower, within a shared host's noise); at most min(2, "
                 f"cores / cores busy with 1 replica): both replicas share the host's cores",
         "pass": bool(ratio >= THROUGHPUT_GOAL and both and ok_all),
         "detail": f"median of {len(rounds)} alternating round(s), 2 vs 1 replicas at concurrency {CONCURRENCY}: "
                   f"{per_round} ({budget['throughput_requests']} image requests x {TOKENS} tokens per phase); "
                   f"{cores} cores: 1 replica kept {busy1:.2f} busy, 2 kept {busy2:.2f}, so the ratio is bounded by "
                   f"min(2, {cores}/{busy1:.2f}) = {bound:.2f}, less the {other:.2f} cores other processes (client "
                   f"included) took meanwhile"},
        {"name": "routing_overhead_p50_ms", "value": round(overhead, 3),
         "goal": f"<= max({OVERHEAD_GOAL_MS} ms, {OVERHEAD_GOAL_FRACTION:.0%} of the 1-replica p50)",
         "pass": bool(overhead <= allowed),
         "detail": f"sequential 1-token requests, alternating: p50 {p50_2:.2f} ms over 2 replicas vs {p50_1:.2f} ms "
                   f"with 1 replica ({budget['latency_requests']} each); allowed {allowed:.2f} ms"},
        {"name": "routing_decision_p50_us", "value": round(pick["p50"], 3),
         "goal": f"<= {PICK_GOAL_US} us", "pass": bool(pick["p50"] <= PICK_GOAL_US),
         "detail": f"ReplicaSet.pick + counters, 2 replicas, {pick['n']} calls: p50 {pick['p50']:.2f} us, "
                   f"p99 {pick['p99']:.2f} us"},
    ]
    return {"benchmark": NAME, "time": utc_now(), "quick": quick, "machine": machine_info(),
            "command": f"python -m benchmarks.{NAME}{' --quick' if quick else ''}", "build": info.to_dict(),
            **m, "pick_us": pick, "targets": targets,
            "load_average_1m": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
            "note": "timings measured on a shared, loaded host are noisy; the ratio and the difference compare "
                    "alternating runs of the same invocation"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests: a smoke run, not a measurement")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "replicas.json")
    args = ap.parse_args(argv)
    res = run(quick=args.quick)
    for t in res["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {t['detail']} (value {t['value']}, goal {t['goal']})")
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
