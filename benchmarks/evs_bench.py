"""EVS (Efficient Video Sampling): time to first token and prompt tokens for the same video at
pruning rates q = 0, 0.5, 0.7, 0.9, measured against Triton's `nemovl` entry model over gRPC.

EVS prunes the projected video tokens before the LLM prefill, so the vision-encoder cost stays the
same and the prefill shrinks: TTFT falls with the prompt length. The retained count (docs/model.md §3.4) is
R = max(tokens_per_frame, int(T · tokens_per_frame · (1 − q))).

Run alone: `python -m benchmarks.evs_bench --triton HOST:PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from benchmarks.clients import TritonClient, Workload
from benchmarks.common import RESULTS_DIR, machine_info, make_mp4, summarize, utc_now, write_json

RATES = (0.0, 0.5, 0.7, 0.9)
VIDEO = {"width": 320, "height": 240, "fps": 8, "num_frames": 64}  # an 8 s clip
SAMPLED_FRAMES = 16  # frames the model sees (num_frames request option)


def evs_workload(video: bytes, max_tokens: int = 4) -> Workload:
    """One video question with a fixed frame count and a short greedy answer."""
    return Workload(name="video-evs", prompt="What happens in this video?", video=video,
                    params={"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                            "num_frames": SAMPLED_FRAMES})


async def _run(triton_url: str, repeats: int, rates: tuple[float, ...]) -> list[dict[str, Any]]:
    video = make_mp4(**VIDEO)
    workload = evs_workload(video)
    client = TritonClient(triton_url)
    rows: list[dict[str, Any]] = []
    try:
        await client.send(workload, {"video_pruning_rate": 0.0})  # warm-up
        samples: dict[float, list[Any]] = {q: [] for q in rates}
        for _ in range(repeats):  # interleave the rates so drift hits each of them alike
            for q in rates:
                samples[q].append(await client.send(workload, {"video_pruning_rate": q}))
        for q in rates:
            recs = samples[q]
            ok = [r for r in recs if r.ok]
            info = next((r.extra.get("info") for r in ok if isinstance(r.extra.get("info"), dict)), {})
            rows.append({
                "q": q, "requests": len(recs), "errors": len(recs) - len(ok),
                "error_samples": sorted({r.error for r in recs if not r.ok})[:2],
                "prompt_tokens": ok[0].prompt_tokens if ok else None,
                "evs_pruned_tokens": info.get("evs_pruned_tokens") if isinstance(info, dict) else None,
                "frames": info.get("frames") if isinstance(info, dict) else None,
                "ttft_ms": summarize([r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
                "e2e_ms": summarize([r.e2e_s for r in ok], 1e3),
            })
    finally:
        await client.close()
    base = rows[0]
    for row in rows:
        if base["prompt_tokens"] and row["prompt_tokens"]:
            row["prompt_tokens_vs_q0"] = row["prompt_tokens"] / base["prompt_tokens"]
        if base["ttft_ms"]["p50"] and row["ttft_ms"]["p50"]:
            row["ttft_p50_vs_q0"] = row["ttft_ms"]["p50"] / base["ttft_ms"]["p50"]
    return rows


def bench_evs(triton_url: str, repeats: int = 3, rates: tuple[float, ...] = RATES) -> dict[str, Any]:
    """TTFT and prompt tokens per pruning rate for one generated clip (VIDEO, SAMPLED_FRAMES frames)."""
    rows = asyncio.run(_run(triton_url, repeats, rates))
    return {"video": {**VIDEO, "sampled_frames": SAMPLED_FRAMES, "codec": "h264"}, "repeats": repeats,
            "rates": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton", required=True, help="HOST:PORT of a running Triton gRPC endpoint")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "evs.json")
    args = ap.parse_args(argv)
    result = {"benchmark": "evs", "time": utc_now(), "machine": machine_info(),
              **bench_evs(args.triton, args.repeats)}
    write_json(args.out, result)
    print(json.dumps([{k: r[k] for k in ("q", "prompt_tokens")} | {"ttft_p50_ms": r["ttft_ms"]["p50"]}
                      for r in result["rates"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
