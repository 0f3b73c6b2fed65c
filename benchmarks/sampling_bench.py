"""Sampling-surface benchmarks on the reference engine, in this process (no server), each against a baseline
measured in the same run:

1. constrained decoding: decode time per token with a grammar (structured output) vs without, batch 1 and 4
   (goal ≤ 1.3×);
2. grammar compile time of a 30-field invoice schema, first and cached (the engine's GrammarCompiler and the
   frontend's validate_spec);
3. n = 4 choices vs 4 separate requests for one long prompt: prompt tokens computed and wall time (goal: ≥ 2×
   less prompt compute).

`python -m benchmarks.sampling_bench [--checkpoint DIR] [--quick]` (also a section of `make bench`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine_info, utc_now, write_json

CONSTRAINED_GOAL = 1.3
N_PREFILL_GOAL = 2.0


def invoice_schema(fields: int = 30) -> dict[str, Any]:
    """A 30-field invoice: strings, bounded integers / amounts, enums, dates, a nested address and line items."""
    kinds = ("string", "integer", "amount", "boolean", "enum", "lines", "address", "date")
    props: dict[str, Any] = {}
    for i in range(fields):
        k = kinds[i % len(kinds)]
        props[f"{k}_{i}"] = {
            "string": {"type": "string", "maxLength": 24},
            "integer": {"type": "integer", "minimum": 0, "maximum": 100000},
            "amount": {"type": "number", "minimum": 0, "maximum": 1e6, "multipleOf": 0.01},
            "boolean": {"type": "boolean"},
            "enum": {"enum": ["EUR", "USD", "GBP", "JPY"]},
            "lines": {"type": "array", "maxItems": 5, "items": {
                "type": "object", "additionalProperties": False, "required": ["sku", "qty", "price"],
                "properties": {"sku": {"type": "string", "maxLength": 10},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                               "price": {"type": "number", "minimum": 0, "multipleOf": 0.01}}}},
            "address": {"type": "object", "additionalProperties": False, "required": ["street", "zip", "city"],
                        "properties": {"street": {"type": "string", "maxLength": 30},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                       "city": {"type": "string", "maxLength": 20}}},
            "date": {"type": "string", "format": "date"},
        }[k]
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _load(checkpoint: Path) -> tuple[Any, Any, Any]:
    from nemovl_trt.checkpoint.loader import load_checkpoint
    from nemovl_trt.model.grammar import GrammarCompiler
    from nemovl_trt.model.vlm import NemotronVLM

    ckpt = load_checkpoint(checkpoint)
    model = NemotronVLM.from_checkpoint(ckpt)
    eos = tuple(ckpt.generation.eos_token_ids) or tuple(ckpt.tokenizer.eos_ids)
    return model, ckpt.tokenizer, GrammarCompiler.for_tokenizer(ckpt.tokenizer, model.cfg.llm.vocab_size, list(eos))


def _run(engine: Any, requests: list[tuple[str, list[int], Any]]) -> tuple[float, int]:
    """Wall time of the decode steps (after every request's prefill) and the tokens they produced."""
    for rid, ids, params in requests:
        engine.add(rid, ids, None, params)
    engine.step()  # prefills + first tokens: not part of the per-token decode cost
    tokens, t0 = 0, time.perf_counter()
    while engine.has_work():
        tokens += sum(1 for e in engine.step() if e.token_id is not None)
    return time.perf_counter() - t0, tokens


def bench_constrained(model: Any, tok: Any, grammars: Any, tokens: int, repeats: int) -> dict[str, Any]:
    from nemovl_trt.model.engine import ReferenceEngine
    from nemovl_trt.model.sampling import SamplingParams

    prompt = tok.encode("Write the invoice as JSON.")
    # json_object: a random-weight model keeps writing (strings, keys), so every run has `tokens` tokens
    grammar = grammars.compile({"type": "json_object"})
    out: dict[str, Any] = {}
    for batch in (1, 4):
        per: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        counts: dict[str, int] = {"unconstrained": 0, "constrained": 0}
        for r in range(-1, repeats):  # r = -1: warm-up, not recorded
            for name, g in (("unconstrained", None), ("constrained", grammar)):
                params = SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=r, ignore_eos=True, grammar=g)
                engine = ReferenceEngine(model)
                wall, n = _run(engine, [(f"{name}{i}", prompt, params) for i in range(batch)])
                if r >= 0:
                    per[name].append(wall / max(n, 1))
                    counts[name] += n
        base, con = min(per["unconstrained"]), min(per["constrained"])
        out[f"batch_{batch}"] = {"unconstrained_ms_per_token": base * 1e3, "constrained_ms_per_token": con * 1e3,
                                 "ratio": con / base, "tokens": counts, "goal": CONSTRAINED_GOAL,
                                 "pass": con / base <= CONSTRAINED_GOAL}
    return out


def bench_compile(tok: Any, vocab: int, eos: list[int]) -> dict[str, Any]:
    from nemovl_trt.model import grammar as gmod

    spec = {"type": "json_schema", "schema": invoice_schema(30), "strict": True}
    t0 = time.perf_counter()
    compiler = gmod.GrammarCompiler.for_tokenizer(tok, vocab, eos)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile(spec)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile(spec)
    cached = time.perf_counter() - t0
    gmod._VALID.clear()
    t0 = time.perf_counter()
    gmod.validate_spec(spec)
    v_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    gmod.validate_spec(spec)
    v_cached = time.perf_counter() - t0
    return {"fields": 30, "tokenizer_setup_ms": tokenizer_s * 1e3, "engine_first_ms": first * 1e3,
            "engine_cached_ms": cached * 1e3, "frontend_validate_first_ms": v_first * 1e3,
            "frontend_validate_cached_ms": v_cached * 1e3, "cache_hits": compiler.hits, "cache_misses": compiler.misses}


def bench_n(model: Any, prompt_len: int, tokens: int) -> dict[str, Any]:
    from nemovl_trt.model.engine import ReferenceEngine
    from nemovl_trt.model.sampling import SamplingParams

    vocab = model.cfg.llm.vocab_size
    prompt = [20 + (i * 7919) % (vocab - 40) for i in range(prompt_len)]
    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=1, ignore_eos=True)

    def timed(reqs: list[tuple[str, Any]]) -> tuple[float, int]:
        engine = ReferenceEngine(model)
        t0 = time.perf_counter()
        for rid, p in reqs:
            engine.add(rid, prompt, None, p)
        while engine.has_work():
            engine.step()
        return time.perf_counter() - t0, engine.prefill_tokens

    sep_s, sep_tokens = timed([(f"r{i}", params) for i in range(4)])
    n_s, n_tokens = timed([("n4", SamplingParams(**{**params.__dict__, "n": 4}))])
    return {"prompt_tokens": prompt_len, "new_tokens_per_choice": tokens,
            "separate": {"prompt_tokens_computed": sep_tokens, "wall_s": sep_s},
            "n4": {"prompt_tokens_computed": n_tokens, "wall_s": n_s},
            "prompt_compute_ratio": sep_tokens / n_tokens, "wall_ratio": sep_s / n_s, "goal": N_PREFILL_GOAL,
            "pass": sep_tokens / n_tokens >= N_PREFILL_GOAL}


def run(checkpoint: Path, quick: bool = False) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    model, tok, grammars = _load(checkpoint)
    eos = list(tok.eos_ids)
    return {"benchmark": "sampling", "time": utc_now(), "checkpoint": str(checkpoint),
            "constrained_decoding": bench_constrained(model, tok, grammars, tokens=16 if quick else 128,
                                                      repeats=1 if quick else 5),
            "grammar_compile": bench_compile(tok, model.cfg.llm.vocab_size, eos),
            "n_vs_separate": bench_n(model, prompt_len=256 if quick else 2048, tokens=4 if quick else 16)}


def lines(res: dict[str, Any]) -> list[str]:
    """Human-readable summary lines (ratio against the baseline of the same run)."""
    out = []
    for b, r in res["constrained_decoding"].items():
        out.append(f"constrained decoding ({b}): {r['constrained_ms_per_token']:.2f} vs "
                   f"{r['unconstrained_ms_per_token']:.2f} ms/token = {r['ratio']:.2f}x "
                   f"(goal <= {CONSTRAINED_GOAL}x: {'PASS' if r['pass'] else 'FAIL'})")
    c = res["grammar_compile"]
    out.append(f"grammar compile, 30-field invoice: engine first {c['engine_first_ms']:.2f} ms, cached "
               f"{c['engine_cached_ms']:.3f} ms; frontend check first {c['frontend_validate_first_ms']:.2f} ms, "
               f"cached {c['frontend_validate_cached_ms']:.3f} ms")
    n = res["n_vs_separate"]
    out.append(f"n=4 vs 4 requests ({n['prompt_tokens']}-token prompt): prompt tokens computed "
               f"{n['n4']['prompt_tokens_computed']} vs {n['separate']['prompt_tokens_computed']} = "
               f"{n['prompt_compute_ratio']:.1f}x less (goal >= {N_PREFILL_GOAL}x: {'PASS' if n['pass'] else 'FAIL'}); "
               f"wall {n['n4']['wall_s']:.2f} vs {n['separate']['wall_s']:.2f} s = {n['wall_ratio']:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "tiny-trained")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    res = run(args.checkpoint, quick=args.quick)
    res["machine"] = machine_info()
    res["command"] = "python -m benchmarks.sampling_bench" + (" --quick" if args.quick else "")
    write_json(args.results_dir / "sampling.json", res)
    print("\n".join(lines(res)))
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
