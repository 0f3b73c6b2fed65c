"""Decode throughput of the reference engine at several batch sizes.

    .venv/bin/python -m nemovl_trt.model.bench [--checkpoint DIR] [--batch 1 8] [--tokens 64] [--repeats 3]

Without --checkpoint it uses the `tiny` preset with random weights. Reports the best of `repeats`
runs (the machines here are shared, so the best run is the least disturbed one); prefill is excluded.
"""

from __future__ import annotations

import argparse
import time

import torch

from nemovl_trt.model.engine import ReferenceEngine
from nemovl_trt.model.sampling import SamplingParams
from nemovl_trt.model.vlm import NemotronVLM


def tiny_random_model(vocab_size: int = 512, seed: int = 0) -> NemotronVLM:
    """The `tiny` preset with random weights (vocab_size filled in; the last id is the image context)."""
    from nemovl_trt.checkpoint.config import parse_vlm_config
    from nemovl_trt.checkpoint.presets import preset_config
    from nemovl_trt.model.random_init import random_init_

    d = preset_config("tiny")
    d["llm_config"]["vocab_size"] = vocab_size
    d["img_context_token_id"] = vocab_size - 1
    return random_init_(NemotronVLM(parse_vlm_config(d)), seed).eval()


def decode_tokens_per_second(model: NemotronVLM, batch: int, new_tokens: int, prompt_len: int = 32) -> float:
    """Generated tokens per second of the decode steps (after every request's prefill) at `batch`."""
    engine = ReferenceEngine(model)
    g = torch.Generator().manual_seed(batch)
    top = model.cfg.img_context_token_id
    for i in range(batch):
        ids = torch.randint(0, top, (prompt_len,), generator=g).tolist()
        engine.add(f"r{i}", ids, None, SamplingParams(max_new_tokens=new_tokens + 1, ignore_eos=True))
    engine.step()  # prefill all (and their first token)
    n = 0
    start = time.perf_counter()
    while engine.has_work():
        n += sum(1 for ev in engine.step() if ev.token_id is not None)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from nemovl_trt.checkpoint.loader import load_checkpoint

        model = NemotronVLM.from_checkpoint(load_checkpoint(args.checkpoint))
    else:
        model = tiny_random_model()
    for b in args.batch:
        best = max(decode_tokens_per_second(model, b, args.tokens) for _ in range(args.repeats))
        print(f"batch {b}: {best:.1f} tokens/s ({best / b:.1f} per sequence), threads {args.threads}")


if __name__ == "__main__":
    main()
