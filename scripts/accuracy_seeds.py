#!/usr/bin/env python3
"""Per-type accuracy of a checkpoint over several unseen eval seeds, with 95 % Wilson intervals.

    python scripts/accuracy_seeds.py [--checkpoint data/tiny-trained] [--seeds 1 2 3 ...] [--per-type 20]
                                     [--json OUT.json]

Builds the cpu target and serves it (as `make demo`), then runs the synthetic eval (`nemovl eval`'s
`evaluate`) once per seed (split "eval", never seen in training), and prints per seed and per type the
accuracy, its interval, the pooled accuracy over all seeds and the seeds on which a type falls under 90 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemovl_trt.evaluation.metrics import wilson_interval  # noqa: E402
from nemovl_trt.training.tasks import QUESTION_TYPES  # noqa: E402

BOUND = 0.9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "tiny-trained")
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 22, 33, 44, 55, 66, 77, 88])
    ap.add_argument("--per-type", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path(".cache/accuracy_seeds"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from nemovl_trt import demo
    from nemovl_trt.training.evaluate import evaluate

    engines, repo = demo.build(args.checkpoint, args.workdir, log=lambda _: None)
    runs: dict[int, dict[str, list[int]]] = {}
    t0 = time.perf_counter()
    with demo.serve(repo, engines, log=lambda _: None) as base:
        for seed in args.seeds:
            res = evaluate(base.removesuffix("/v1"), n=args.per_type * len(QUESTION_TYPES), seed=seed, concurrency=4)
            runs[seed] = {t: [sum(r.correct for r in res.records if r.qtype == t), res.counts[t]]
                          for t in QUESTION_TYPES}
            print(f"seed {seed}: " + ", ".join(f"{t} {k}/{n}" for t, (k, n) in runs[seed].items()), flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    header = f"{'type':<12}" + "".join(f"{'s' + str(s):>9}" for s in args.seeds) + f"{'pooled':>10}  95% CI (pooled)"
    print(header)
    summary: dict[str, dict] = {}
    for t in QUESTION_TYPES:
        ks = [runs[s][t][0] for s in args.seeds]
        ns = [runs[s][t][1] for s in args.seeds]
        lo, hi = wilson_interval(sum(ks), sum(ns))
        accs = [k / n for k, n in zip(ks, ns, strict=True)]
        below = [s for s, a in zip(args.seeds, accs, strict=True) if a < BOUND]
        summary[t] = {"per_seed": dict(zip(map(str, args.seeds), accs, strict=True)), "pooled": sum(ks) / sum(ns),
                      "ci95": [lo, hi], "min": min(accs), "max": max(accs), "seeds_below_90": below,
                      "per_seed_ci95": {str(s): wilson_interval(k, n) for s, k, n in zip(args.seeds, ks, ns, strict=True)}}
        print(f"{t:<12}" + "".join(f"{a:>9.0%}" for a in accs) + f"{sum(ks) / sum(ns):>10.1%}  [{lo:.1%}, {hi:.1%}]"
              + (f"  < 90 % on seeds {below}" if below else ""))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "per_type_questions": args.per_type,
                                         "seeds": args.seeds, "types": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
