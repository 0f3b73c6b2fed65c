"""Why llguidance: the two grammar engines on PyPI (llguidance, xgrammar) measured on the tiny tokenizer.

For a 30-field invoice schema (benchmarks/sampling_bench.py): tokenizer setup, compile time (first and
again), and per-token cost of mask + advance over random walks (each step picks a uniformly random allowed
token, as a random-weight model does), plus how many walks end in valid JSON (`json.loads`, strict).
Engines that are not installed are reported as such (the project installs llguidance only; to measure
xgrammar, install it into a scratch environment: `pip install xgrammar`).

`python -m benchmarks.grammar_engines [--walks 20]` → benchmarks/results/grammar_engines.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, utc_now, write_json
from benchmarks.sampling_bench import invoice_schema

TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "tiny-trained" / "tokenizer.json"
MAX_STEPS = 4000


def _walk(allowed_fn: Any, consume_fn: Any, eos: set[int], seed: int) -> tuple[list[float], list[int]]:
    rng = random.Random(seed)
    times, toks = [], []
    for _ in range(MAX_STEPS):
        t0 = time.perf_counter()
        allowed = allowed_fn()
        t1 = time.perf_counter()
        ids = np.flatnonzero(allowed)
        if ids.size == 0:
            break
        tok = int(ids[rng.randrange(ids.size)])
        if tok in eos:
            times.append(t1 - t0)
            break
        t2 = time.perf_counter()
        done = consume_fn(tok)
        times.append((t1 - t0) + (time.perf_counter() - t2))
        toks.append(tok)
        if done:
            break
    return times, toks


def _bits(raw: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(raw.view(np.uint8), bitorder="little")[:vocab]


def measure_llguidance(tok: Any, vocab: int, eos: list[int], schema: dict[str, Any], walks: int) -> dict[str, Any]:
    import llguidance as llg

    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t0
    opts = {"whitespace_flexible": False}
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=opts)
    proto = llg.LLMatcher(lltok, grammar, log_level=0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=opts), log_level=0)
    again = time.perf_counter() - t0
    per, valid = [], 0
    for seed in range(walks):
        m = proto.deep_copy()

        def consume(t: int, m: Any = m) -> bool:
            assert m.consume_token(t), m.get_error()
            return m.is_stopped()

        times, toks = _walk(lambda m=m: _bits(np.frombuffer(m.compute_bitmask(), np.uint8), vocab), consume,
                            set(eos), seed)
        per += times
        valid += _valid(tok.decode(toks))
    return {"version": llg.__dict__.get("__version__") or _version("llguidance"), "tokenizer_setup_ms": setup * 1e3,
            "compile_first_ms": first * 1e3, "compile_again_ms": again * 1e3,
            "per_token_ms": float(np.mean(per)) * 1e3, "valid_json": valid, "walks": walks}


def measure_xgrammar(tok: Any, vocab: int, eos: list[int], schema: dict[str, Any], walks: int) -> dict[str, Any]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER)),
                                              vocab_size=vocab, stop_token_ids=eos)
    setup = time.perf_counter() - t0
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    again = time.perf_counter() - t0
    per, valid = [], 0
    for seed in range(walks):
        m = xgr.GrammarMatcher(compiled)
        bm = xgr.allocate_token_bitmask(1, vocab)

        def allowed(m: Any = m, bm: Any = bm) -> np.ndarray:
            m.fill_next_token_bitmask(bm, 0)
            return _bits(bm[0].numpy(), vocab)

        def consume(t: int, m: Any = m) -> bool:
            assert m.accept_token(t)
            return m.is_terminated()

        times, toks = _walk(allowed, consume, set(eos), seed)
        per += times
        valid += _valid(tok.decode([t for t in toks if t not in eos]))
    return {"version": _version("xgrammar"), "tokenizer_setup_ms": setup * 1e3, "compile_first_ms": first * 1e3,
            "compile_again_ms": again * 1e3, "per_token_ms": float(np.mean(per)) * 1e3, "valid_json": valid,
            "walks": walks}


def _valid(text: str) -> int:
    try:
        json.loads(text)
    except ValueError:
        return 0
    return 1


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--walks", type=int, default=20)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = [tok.token_to_id("<SPECIAL_12>"), tok.token_to_id("</s>")]
    schema = invoice_schema(30)
    out: dict[str, Any] = {"benchmark": "grammar_engines", "time": utc_now(), "vocab": vocab,
                           "schema": "invoice, 30 fields", "machine": machine_info(), "engines": {}}
    for name, fn in (("llguidance", measure_llguidance), ("xgrammar", measure_xgrammar)):
        try:
            out["engines"][name] = fn(tok, vocab, eos, schema, args.walks)
        except ImportError as e:
            out["engines"][name] = {"not_installed": str(e)}
    write_json(args.results_dir / "grammar_engines.json", out)
    for name, r in out["engines"].items():
        if "not_installed" in r:
            print(f"{name}: not installed")
            continue
        print(f"{name} {r['version']}: compile {r['compile_first_ms']:.2f} ms first, {r['compile_again_ms']:.3f} ms "
              f"again; mask+advance {r['per_token_ms']:.4f} ms/token; valid JSON {r['valid_json']}/{r['walks']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
