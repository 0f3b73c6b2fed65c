"""Continuous batching on the PyTorch reference engine: output-token throughput with 8 requests in
flight vs 1, same prompts and lengths.

Direct: `ReferenceEngine` in this process (no server). Each request generates exactly
`max_new_tokens` tokens (the engine gets no EOS ids), so both runs do the same work. A closed loop
keeps `concurrency` requests in the engine: when one finishes the next is added before the next
`step()` (that is continuous batching; with equal lengths the batch refills in waves).

Optional: the same comparison through Triton (`triton_url`), text-only requests with `ignore_eos`, with the
`llm` model's own counters (mean decode batch, ms per step) and the issue-17 target (c=8 / c=1 ≥ 3.5×,
next to the engine-alone ratio of the same run).

Run alone: `python -m benchmarks.batching_bench --checkpoint DIR [--triton HOST:PORT]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine_info, print_targets, summarize, utc_now, write_json

TARGET_SPEEDUP = 4.0  # issue 8: throughput at concurrency 8 ≥ 4 × concurrency 1
TARGET_TRITON_SPEEDUP = 3.5  # issue 17: the same ratio through Triton's `nemovl` entry model
_PROMPTS = (
    "Summarize the key points of the attached quarterly report in three sentences.",
    "What is the total amount due on this invoice, and when is it due?",
    "List every item on the receipt with its price.",
    "Explain what the chart shows about revenue growth between 2019 and 2023.",
    "Translate the heading of the manual page into French.",
    "Which step of the assembly instructions uses the smallest screw?",
    "Describe the layout of the form and the fields a user must fill in.",
    "Is the signature on the contract dated before or after the effective date?",
)


def _load_engine(checkpoint: Path) -> tuple[Any, Any, list[list[int]]]:
    """Load the checkpoint into a ReferenceEngine without EOS ids. Returns (engine, SamplingParams, prompts)."""
    from nemovl_trt.checkpoint.loader import load_checkpoint
    from nemovl_trt.model.engine import ReferenceEngine, SamplingParams
    from nemovl_trt.model.vlm import NemotronVLM

    ckpt = load_checkpoint(checkpoint)
    model = NemotronVLM.from_checkpoint(ckpt, dtype="float32")
    engine = ReferenceEngine(model, eos_ids=())
    bos = [ckpt.tokenizer.bos_id] if ckpt.tokenizer.bos_id is not None else []
    prompts = [bos + ckpt.tokenizer.encode(p) for p in _PROMPTS]
    return engine, SamplingParams, prompts


def run_engine_loop(engine: Any, sampling_cls: Any, prompts: list[list[int]], concurrency: int,
                    num_requests: int, max_new_tokens: int, time_budget_s: float) -> dict[str, Any]:
    """Closed loop over the engine with `concurrency` requests in flight.

    Returns tokens generated, wall seconds, output tokens/s, requests/s, per-step latency (ms) and
    batch sizes seen. No new request is added after `time_budget_s`; requests in flight finish.
    """
    started = 0
    finished = 0
    tokens = 0
    in_flight: set[str] = set()
    step_ms: list[float] = []
    batch_sizes: list[int] = []
    t0 = time.perf_counter()
    deadline = t0 + time_budget_s
    while True:
        while len(in_flight) < concurrency and started < num_requests and time.perf_counter() < deadline:
            rid = f"r{started}"
            params = sampling_cls(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                  seed=started, stop_token_ids=())
            engine.add(rid, prompts[started % len(prompts)], None, params)
            in_flight.add(rid)
            started += 1
        if not in_flight:
            break
        batch_sizes.append(len(in_flight))
        s0 = time.perf_counter()
        outputs = engine.step()
        step_ms.append((time.perf_counter() - s0) * 1e3)
        for out in outputs:
            if out.token_id is not None and out.token_id >= 0:
                tokens += 1
            if out.finished:
                in_flight.discard(out.request_id)
                finished += 1
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency, "requests": finished, "max_new_tokens": max_new_tokens,
        "output_tokens": tokens, "wall_s": wall,
        "output_token_throughput_tps": tokens / wall if wall > 0 else None,
        "request_throughput_rps": finished / wall if wall > 0 else None,
        "step_ms": summarize(step_ms), "mean_batch": sum(batch_sizes) / max(len(batch_sizes), 1),
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine several closed-loop runs of the same concurrency: tokens and requests add up, so do walls."""
    tokens = sum(r["output_tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    done = sum(r["requests"] for r in runs)
    return {"concurrency": runs[0]["concurrency"], "requests": done, "max_new_tokens": runs[0]["max_new_tokens"],
            "output_tokens": tokens, "wall_s": wall, "output_token_throughput_tps": tokens / wall if wall else None,
            "request_throughput_rps": done / wall if wall else None, "rounds": len(runs),
            "step_ms_p50_per_round": [r["step_ms"]["p50"] for r in runs],
            "mean_batch": sum(r["mean_batch"] for r in runs) / len(runs)}


def bench_engine(checkpoint: Path, max_new_tokens: int = 48, requests_c1: int = 4, requests_c8: int = 16,
                 time_budget_s: float = 40.0, threads: int = 1, rounds: int = 2) -> dict[str, Any]:
    """Throughput of the reference engine at concurrency 1 and 8 (same prompts, same lengths).

    `threads`: torch intra-op threads — 1 is what the Triton `llm` model runs with (the launcher sets
    OMP_NUM_THREADS=1). The two concurrencies alternate over `rounds` rounds (c1, c8, c1, c8, …) so
    that load from other processes on a shared machine does not favour either.
    """
    import torch

    engine, sampling_cls, prompts = _load_engine(checkpoint)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    c1_runs, c8_runs = [], []
    try:
        with torch.inference_mode():
            run_engine_loop(engine, sampling_cls, prompts, 8, 8, 4, time_budget_s)  # warm-up
            for _ in range(rounds):
                c1_runs.append(run_engine_loop(engine, sampling_cls, prompts, 1, max(1, requests_c1 // rounds),
                                               max_new_tokens, time_budget_s / rounds))
                c8_runs.append(run_engine_loop(engine, sampling_cls, prompts, 8, max(1, requests_c8 // rounds),
                                               max_new_tokens, time_budget_s / rounds))
    finally:
        torch.set_num_threads(before)
    c1, c8 = _merge(c1_runs), _merge(c8_runs)
    speedup = c8["output_token_throughput_tps"] / c1["output_token_throughput_tps"]
    return {"torch_threads": threads, "c1": c1, "c8": c8, "speedup": speedup, "target": TARGET_SPEEDUP,
            "pass": bool(speedup >= TARGET_SPEEDUP)}


async def _bench_triton_async(triton_url: str, max_new_tokens: int, requests_c1: int, requests_c8: int,
                              time_budget_s: float, rounds: int) -> dict[str, Any]:
    from benchmarks.clients import TritonClient, Workload
    from benchmarks.loadgen import LoadResult, closed_loop

    workloads = [Workload(name="text", prompt=p, params={"max_tokens": max_new_tokens, "temperature": 0.0,
                                                           "ignore_eos": True}) for p in _PROMPTS]
    client = TritonClient(triton_url)
    parts: dict[int, list[LoadResult]] = {1: [], 8: []}
    # llm counters per concurrency: decode steps, sequences summed over them, s in step(), s idle
    # and token responses sent (`messages`, the stream interval's effect)
    steps: dict[int, list[float]] = {1: [0, 0, 0.0, 0.0, 0], 8: [0, 0, 0.0, 0.0, 0]}
    try:
        await client.send(workloads[0])  # warm-up
        for _ in range(rounds):  # c1, c8, c1, c8, …: drift on a shared machine hits both alike
            for conc, n in ((1, requests_c1), (8, requests_c8)):
                before = await asyncio.to_thread(llm_stats, triton_url)
                parts[conc].append(await closed_loop(lambda i: client.send(workloads[i % len(workloads)]), conc,
                                                     max(1, n // rounds), time_budget_s / rounds))
                after = await asyncio.to_thread(llm_stats, triton_url)
                steps[conc][0] += after.get("steps", 0) - before.get("steps", 0)
                steps[conc][1] += after.get("step_sequences", 0) - before.get("step_sequences", 0)
                steps[conc][2] += after.get("step_s", 0.0) - before.get("step_s", 0.0)
                steps[conc][3] += after.get("idle_s", 0.0) - before.get("idle_s", 0.0)
                steps[conc][4] += after.get("messages", 0) - before.get("messages", 0)
    finally:
        await client.close()
    out: dict[str, Any] = {}
    for conc, runs in parts.items():
        merged = LoadResult(conc, [r for run in runs for r in run.records], sum(run.wall_s for run in runs))
        out[f"c{conc}"] = merged.summary()
        n_steps, seqs, step_s, idle_s, messages = steps[conc]
        # what the llm saw: its mean decode batch, wall time per step (whole loop), time inside step() per
        # step, and the share of the wall time it had nothing to run (waiting for requests to arrive)
        row = out[f"c{conc}"]
        row["llm_steps"] = int(n_steps)
        row["llm_mean_batch"] = seqs / n_steps if n_steps and seqs else None  # None: not reported
        row["llm_ms_per_step"] = merged.wall_s * 1e3 / n_steps if n_steps else None
        row["llm_step_ms"] = step_s * 1e3 / n_steps if n_steps and step_s else None
        row["llm_idle_share"] = idle_s / merged.wall_s if merged.wall_s and step_s else None
        row["llm_tokens_per_response"] = seqs / messages if messages and seqs else None  # None: not reported
    c1 = out["c1"]["output_token_throughput_tps"]
    out["speedup"] = out["c8"]["output_token_throughput_tps"] / c1 if c1 else None
    out["rounds"] = rounds
    return out


def llm_stats(triton_url: str) -> dict[str, Any]:
    """The `llm` model's counters (its `{"op": "stats"}` control request; docs/triton.md). {} when the
    engine does not report them."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        ids = grpcclient.InferInput("input_ids", [0], "INT64")
        ids.set_data_from_numpy(np.zeros((0,), dtype=np.int64))
        control = grpcclient.InferInput("control", [1], "BYTES")
        control.set_data_from_numpy(np.array([json.dumps({"op": "stats"}).encode()], dtype=np.object_))
        client.async_stream_infer("llm", [ids, control])
        result, error = results.get(timeout=30)
        if error is not None:
            return {}
        return json.loads(result.as_numpy("info")[0].decode())
    finally:
        client.stop_stream()
        client.close()


def triton_targets(triton: dict[str, Any], engine_speedup: float | None) -> list[dict[str, Any]]:
    """The issue-17 target of a `bench_triton` result, with the engine-alone ratio of the same run as
    context (None: not measured in this run)."""
    speedup = triton.get("speedup")
    c1, c8 = triton["c1"], triton["c8"]

    def fmt(v: float | None, spec: str = ".1f") -> str:
        return "n/a" if v is None else format(v, spec)

    engine = f"engine alone {engine_speedup:.2f}× in the same run" if engine_speedup is not None \
        else "engine alone not measured in this run"
    detail = (f"{fmt(c8['output_token_throughput_tps'])} vs {fmt(c1['output_token_throughput_tps'])} output tok/s "
              f"at c=8 vs c=1 = {fmt(speedup, '.2f')}×; llm mean batch {fmt(c8.get('llm_mean_batch'), '.2f')} "
              f"at c=8, {fmt(c8.get('llm_ms_per_step'))} vs {fmt(c1.get('llm_ms_per_step'))} ms per step "
              f"({fmt(c8.get('llm_step_ms'))} vs {fmt(c1.get('llm_step_ms'))} ms inside step(), idle "
              f"{fmt(c8.get('llm_idle_share'), '.0%')} vs {fmt(c1.get('llm_idle_share'), '.0%')}; tokens per llm "
              f"response {fmt(c8.get('llm_tokens_per_response'), '.2f')} vs {fmt(c1.get('llm_tokens_per_response'), '.2f')}"
              f", the stream interval); {engine}")
    return [{"name": f"Triton path batching at c=8 ≥ {TARGET_TRITON_SPEEDUP}×", "value": speedup,
             "goal": f"≥ {TARGET_TRITON_SPEEDUP}× (c=8 / c=1 output tok/s through `nemovl`)",
             "pass": bool(speedup is not None and speedup >= TARGET_TRITON_SPEEDUP), "detail": detail}]


def bench_triton(triton_url: str, max_new_tokens: int = 48, requests_c1: int = 4, requests_c8: int = 16,
                 time_budget_s: float = 40.0, rounds: int = 2, engine_speedup: float | None = None,
                 ) -> dict[str, Any]:
    """The same comparison through Triton's `nemovl` entry model (gRPC streaming, text-only requests).
    `engine_speedup`: `bench_engine(...)["speedup"]` of the same run, shown next to the target."""
    out = asyncio.run(_bench_triton_async(triton_url, max_new_tokens, requests_c1, requests_c8, time_budget_s,
                                          rounds))
    out["engine_speedup"] = engine_speedup
    out["targets"] = triton_targets(out, engine_speedup)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--triton", default=None, help="HOST:PORT of a running Triton gRPC endpoint (optional)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "batching.json")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"benchmark": "batching", "time": utc_now(), "machine": machine_info(),
                              "engine": bench_engine(args.checkpoint, args.max_new_tokens)}
    if args.triton:
        result["triton"] = bench_triton(args.triton, args.max_new_tokens,
                                        engine_speedup=result["engine"]["speedup"])
        result["targets"] = result["triton"]["targets"]
    write_json(args.out, result)
    print(json.dumps({k: result["engine"][k] for k in ("speedup", "pass")}))
    print_targets(result.get("targets", []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
