"""PNG plots of the benchmark results (matplotlib, Agg backend: no display needed).

`plot_all(results, out_dir)` takes the dict `run_all` writes to results/summary.json and returns the
paths of the PNG files it wrote; a section missing from `results` is skipped.
Run alone: `python -m benchmarks.plots [benchmarks/results/summary.json]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS_DIR  # noqa: E402

_PATHS = {"openai": ("(a) OpenAI endpoint", "tab:blue", "o-"), "triton": ("(b) Triton gRPC", "tab:orange", "s--")}


def _footer(fig: Any, results: dict[str, Any]) -> None:
    m = results.get("machine", {})
    fig.text(0.01, 0.005, f"{m.get('cpu_model', '?')} · {m.get('nproc', '?')} cores · {m.get('ram_gib', '?')} GiB · "
             f"no GPU · checkpoint {results.get('stack', {}).get('checkpoint_kind', '?')} · {results.get('time', '')}",
             fontsize=7, color="gray")


def _save(fig: Any, results: dict[str, Any], path: Path, rect: tuple[float, float, float, float]) -> Path:
    """Add the machine footer, lay out inside `rect` (room for the footer), write `path`, free the figure."""
    _footer(fig, results)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_serving(results: dict[str, Any], out: Path) -> Path | None:
    """Grid: one row per workload; columns TTFT p50, ITL p50, e2e p50 (ms) and request throughput vs concurrency."""
    runs = results.get("serving", {}).get("runs") or []
    if not runs:
        return None
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    metrics = (("ttft_ms", "TTFT p50 (ms)"), ("itl_ms", "ITL p50 (ms/token)"), ("e2e_ms", "e2e p50 (ms)"),
               ("request_throughput_rps", "throughput (req/s)"))
    fig, axes = plt.subplots(len(workloads), len(metrics), figsize=(4 * len(metrics), 3 * len(workloads)),
                             squeeze=False)
    for i, w in enumerate(workloads):
        rows = sorted((r for r in runs if r["workload"] == w), key=lambda r: r["concurrency"])
        conc = [r["concurrency"] for r in rows]
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for path, (name, color, style) in _PATHS.items():
                vals = [r[path][key]["p50"] if isinstance(r[path][key], dict) else r[path][key] for r in rows]
                ax.plot(conc, [v if v is not None else float("nan") for v in vals], style, color=color, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc, [str(c) for c in conc])
            ax.set_title(f"{w}: {label}", fontsize=9)
            ax.set_xlabel("concurrency", fontsize=8)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Serving on the cpu target: OpenAI frontend vs Triton direct", fontsize=11)
    return _save(fig, results, out / "serving.png", rect=(0, 0.02, 1, 0.97))


def plot_overhead(results: dict[str, Any], out: Path) -> Path | None:
    """Frontend added latency at concurrency 1 (its own cost, not queueing), per workload: per request
    (e2e p50 difference, with the paired median's 95 % bootstrap interval as error bar) and per
    streamed token (ITL p50 difference); OpenAI SDK client and plain-httpx client side by side."""
    runs = [r for r in (results.get("serving", {}).get("runs") or []) if r["concurrency"] == 1]
    if not runs:
        return None
    targets = results.get("serving", {}).get("targets", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = list(range(len(runs)))

    def val(v: float | None) -> float:
        return float("nan") if v is None else v

    for off, key, pkey, name, color in ((-0.2, "frontend_overhead", "paired_overhead", "OpenAI SDK client", "tab:blue"),
                                        (0.2, "frontend_overhead_raw_sse", "paired_overhead_raw_sse",
                                         "plain httpx client", "tab:cyan")):
        if not any(r.get(key) for r in runs):
            continue
        p50 = [val((r.get(key) or {}).get("e2e_ms", {}).get("p50")) for r in runs]
        lo, hi = [], []
        for r in runs:
            ci = ((r.get(pkey) or {}).get("e2e_ms") or {}).get("ci95")
            med = ((r.get(pkey) or {}).get("e2e_ms") or {}).get("median")
            lo.append(max(0.0, med - ci[0]) if ci and med is not None else 0.0)
            hi.append(max(0.0, ci[1] - med) if ci and med is not None else 0.0)
        meds = [val(((r.get(pkey) or {}).get("e2e_ms") or {}).get("median")) for r in runs]
        ax1.bar([i + off for i in x], p50, 0.4, color=color, label=f"{name}: p50(a) − p50(b)")
        ax1.errorbar([i + off for i in x], meds, yerr=[lo, hi], fmt="k.", capsize=3, lw=1,
                     label="paired median, 95% CI" if off < 0 else None)
        ax2.bar([i + off for i in x], [val((r.get(key) or {}).get("per_token_ms", {}).get("p50")) for r in runs],
                0.4, color=color, label=name)
    ax1.axhline(targets.get("overhead_p50_ms_max", 2.0), color="red", ls="--", lw=1, label="target ≤ 2 ms")
    ax2.axhline(targets.get("per_token_ms_max", 0.2), color="red", ls="--", lw=1, label="target ≤ 0.2 ms")
    ax1.set_title("frontend added latency per request, concurrency 1 (ms)", fontsize=9)
    ax2.set_title("frontend added latency per streamed token, concurrency 1 (ms)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks(x, [r["workload"] for r in runs])
        ax.axhline(0, color="black", lw=0.5)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, results, out / "frontend_overhead.png", rect=(0, 0.03, 1, 1))


def plot_batching(results: dict[str, Any], out: Path) -> Path | None:
    """Output tokens/s at concurrency 1 vs 8: reference engine direct and through Triton."""
    b = results.get("batching") or {}
    groups = [(name, b[key]) for name, key in (("reference engine", "engine"), ("through Triton", "triton"))
              if isinstance(b.get(key), dict) and "c1" in b[key]]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (_name, g) in enumerate(groups):
        c1, c8 = g["c1"]["output_token_throughput_tps"], g["c8"]["output_token_throughput_tps"]
        ax.bar(i - 0.2, c1, 0.4, color="tab:gray", label="concurrency 1" if i == 0 else None)
        ax.bar(i + 0.2, c8, 0.4, color="tab:purple", label="concurrency 8" if i == 0 else None)
        ax.hlines(4 * c1, i + 0.0, i + 0.4, colors="red", linestyles="--", label="4× c1 target" if i == 0 else None)
        ax.text(i + 0.2, c8, f"{c8 / c1:.1f}×", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("output tokens / s")
    ax.set_title("continuous batching: throughput at concurrency 8 vs 1", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, results, out / "batching.png", rect=(0, 0.04, 1, 1))


def plot_evs(results: dict[str, Any], out: Path) -> Path | None:
    """Prompt tokens (bars) and TTFT p50 (line) vs EVS pruning rate q."""
    rows = (results.get("evs") or {}).get("rates") or []
    rows = [r for r in rows if r.get("prompt_tokens") is not None]
    if not rows:
        return None
    q = [f"q={r['q']}" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(q, [r["prompt_tokens"] for r in rows], color="tab:blue", alpha=0.7, label="prompt tokens")
    ax.set_ylabel("prompt tokens", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(q, [r["ttft_ms"]["p50"] for r in rows], "o-", color="tab:red", label="TTFT p50")
    ax2.set_ylabel("TTFT p50 (ms)", color="tab:red")
    ax2.set_ylim(bottom=0)
    v = results["evs"].get("video", {})
    ax.set_title(f"EVS on one {v.get('sampled_frames', '?')}-frame video: prompt tokens and TTFT", fontsize=10)
    return _save(fig, results, out / "evs.png", rect=(0, 0.04, 1, 1))


def plot_perf_analyzer(results: dict[str, Any], out: Path) -> Path | None:
    """perf_analyzer throughput and p50 latency vs concurrency, text and image inputs."""
    pa = results.get("perf_analyzer") or {}
    runs = [r for r in pa.get("runs", []) if r.get("ok")]
    if not runs:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("text", "o-"), ("image", "s--")):
        rows = sorted((r for r in runs if r["input"] == kind), key=lambda r: r["concurrency"])
        if not rows:
            continue
        c = [r["concurrency"] for r in rows]
        ax1.plot(c, [(r.get("from_export") or {}).get("throughput_rps") or float("nan") for r in rows], style,
                 label=kind)
        ax2.plot(c, [(r["latency_us"].get("p50 latency") or float("nan")) / 1e3 for r in rows], style, label=kind)
    ax1.set_title("perf_analyzer: requests/s (from its timestamps; gRPC streaming)", fontsize=9)
    ax2.set_title("perf_analyzer: p50 request latency (ms)", fontsize=9)
    concs = sorted({r["concurrency"] for r in runs})
    for ax in (ax1, ax2):
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, results, out / "perf_analyzer.png", rect=(0, 0.04, 1, 1))


def plot_all(results: dict[str, Any], out_dir: Path = RESULTS_DIR) -> list[Path]:
    """Write every plot whose data is present; returns the PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [fn(results, out_dir) for fn in (plot_serving, plot_overhead, plot_batching, plot_evs,
                                            plot_perf_analyzer)]
    return [p for p in paths if p is not None]


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "summary.json"
    for p in plot_all(json.loads(src.read_text()), src.parent):
        print(p)
