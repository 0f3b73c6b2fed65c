"""Render benchmarks/results/README.md (and the PASS/FAIL lines printed by `make bench`) from the
summary dict `run_all` writes, so the recorded numbers and their description never drift apart."""

from __future__ import annotations

from typing import Any


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}"
    return str(v)


def target_lines(results: dict[str, Any]) -> list[str]:
    """One 'PASS'/'FAIL' line per target of issue 8."""
    lines = []
    serving = (results.get("serving") or {}).get("targets", {}).get("by_workload", {})
    for w, t in serving.items():
        ci = t.get("paired_ci95_ms")
        paired = (f"; paired median {_f(t.get('paired_median_ms'), 2)} ms, 95% CI [{_f(ci[0], 2)}, {_f(ci[1], 2)}]"
                  if ci else "")
        lines.append(f"{'PASS' if t['request_pass'] else 'FAIL'}  frontend overhead per request (OpenAI SDK client), {w}, c=1: "
                     f"p50 {_f(t['overhead_p50_ms'], 2)} ms (target ≤ 2 ms), p99 {_f(t['overhead_p99_ms'], 2)} ms"
                     f"{paired}")
        lines.append(f"{'PASS' if t['token_pass'] else 'FAIL'}  frontend overhead per streamed token (OpenAI SDK client), {w}, c=1: "
                     f"p50 {_f(t['per_token_p50_ms'], 3)} ms (target ≤ 0.2 ms)")
        if t.get("raw_sse_overhead_p50_ms") is not None:
            lines.append(f"info  same, client = plain httpx instead of the OpenAI SDK, {w}: per request p50 "
                         f"{_f(t['raw_sse_overhead_p50_ms'], 2)} ms, per token p50 "
                         f"{_f(t.get('raw_sse_per_token_p50_ms'), 3)} ms")
    for name, part in _preprocess_parts(results):
        lines.append(f"{'PASS' if part['pass'] else 'FAIL'}  preprocessing, {name}: {part['target']} "
                     f"({_numbers(part)})")
    floor = ((results.get("serving") or {}).get("http_floor_ms") or {}).get("p50")
    if floor is not None:
        lines.append(f"info  one HTTP round trip to the frontend (GET /health, plain httpx): p50 {_f(floor, 2)} ms")
    eng = (results.get("batching") or {}).get("engine")
    if isinstance(eng, dict) and "speedup" in eng:
        lines.append(f"{'PASS' if eng['pass'] else 'FAIL'}  continuous batching, reference engine: concurrency 8 = "
                     f"{_f(eng['speedup'], 2)}× concurrency 1 (target ≥ {_f(eng['target'], 0)}×)")
    for section, t in listed_targets(results):
        lines.append(f"{'PASS' if t.get('pass') else 'FAIL'}  {section}: {t.get('name')}: {_f(t.get('value'), 2)} "
                     f"(goal {t.get('goal')}) {t.get('detail', '')}".rstrip())
    return lines


def listed_targets(results: dict[str, Any], depth: int = 3) -> list[tuple[str, dict[str, Any]]]:
    """(section path, target) for every `"targets": [{"name", "value", "goal", "pass", "detail"}, ...]` list in
    the results of a benchmark module (the format every newer benchmark returns), searched `depth` levels deep."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, path: str, level: int) -> None:
        if not isinstance(node, dict) or level > depth:
            return
        targets = node.get("targets")
        if isinstance(targets, list):
            found.extend((path, t) for t in targets if isinstance(t, dict) and "pass" in t)
        for k, v in node.items():
            if k != "targets" and isinstance(v, dict):
                walk(v, f"{path}.{k}" if path else k, level + 1)

    for name, value in results.items():
        if name not in ("machine", "stack", "errors", "section_seconds"):
            walk(value, name, 1)
    return found


def _preprocess_parts(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The sub-results of benchmarks/preprocess_bench.py that state a target and a pass flag."""
    pre = results.get("preprocess")
    if not isinstance(pre, dict):
        return []
    # parts that carry a "targets" list are printed by listed_targets instead (once)
    return [(k, v) for k, v in pre.items()
            if isinstance(v, dict) and "target" in v and "pass" in v and "targets" not in v]


def _numbers(part: dict[str, Any]) -> str:
    """`key value` for the measured numbers of a preprocessing sub-result."""
    return ", ".join(f"{k} {_f(v, 2)}" for k, v in part.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("reps", "tiles", "frames"))


def _serving_table(results: dict[str, Any]) -> list[str]:
    runs = (results.get("serving") or {}).get("runs") or []
    if not runs:
        return []
    out = ["| workload | conc | path | req/s | tok/s | TTFT p50 / p99 (ms) | ITL p50 (ms) | e2e p50 / p99 (ms) | prompt tok |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for path, name in (("openai", "(a) OpenAI"), ("triton", "(b) Triton")):
            s = r[path]
            out.append(f"| {r['workload']} | {r['concurrency']} | {name} | {_f(s['request_throughput_rps'], 2)} | "
                       f"{_f(s['output_token_throughput_tps'], 0)} | {_f(s['ttft_ms']['p50'])} / {_f(s['ttft_ms']['p99'])} | "
                       f"{_f(s['itl_ms']['p50'], 2)} | {_f(s['e2e_ms']['p50'])} / {_f(s['e2e_ms']['p99'])} | "
                       f"{_f(s['prompt_tokens_mean'], 0)} |")
    return out


def _overhead_table(results: dict[str, Any]) -> list[str]:
    runs = (results.get("serving") or {}).get("runs") or []
    if not runs:
        return []
    out = ["| workload | conc | (a) client | per request e2e p50 / p99 (ms) | TTFT p50 / p99 (ms) | "
           "per token p50 / p99 (ms) |", "|---|---|---|---|---|---|"]
    for r in runs:
        for key, client in (("frontend_overhead", "OpenAI SDK"), ("frontend_overhead_raw_sse", "raw httpx")):
            o = r.get(key)
            if not o:
                continue
            out.append(f"| {r['workload']} | {r['concurrency']} | {client} | "
                       f"{_f(o['e2e_ms']['p50'], 2)} / {_f(o['e2e_ms']['p99'], 2)} | "
                       f"{_f(o['ttft_ms']['p50'], 2)} / {_f(o['ttft_ms']['p99'], 2)} | "
                       f"{_f(o['per_token_ms']['p50'], 3)} / {_f(o['per_token_ms']['p99'], 3)} |")
    return out


def _batching_table(results: dict[str, Any]) -> list[str]:
    b = results.get("batching") or {}
    out = ["| where | c=1 tok/s | c=8 tok/s | speedup |", "|---|---|---|---|"]
    for name, key in (("reference engine (direct)", "engine"), ("through Triton (gRPC)", "triton")):
        g = b.get(key)
        if isinstance(g, dict) and "c1" in g:
            out.append(f"| {name} | {_f(g['c1']['output_token_throughput_tps'], 0)} | "
                       f"{_f(g['c8']['output_token_throughput_tps'], 0)} | {_f(g.get('speedup'), 2)}× |")
    return out if len(out) > 2 else []


def _evs_table(results: dict[str, Any]) -> list[str]:
    rows = (results.get("evs") or {}).get("rates") or []
    if not rows:
        return []
    out = ["| q | prompt tokens | EVS-pruned tokens | TTFT p50 (ms) | TTFT vs q=0 |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['q']} | {_f(r['prompt_tokens'], 0)} | {_f(r.get('evs_pruned_tokens'), 0)} | "
                   f"{_f(r['ttft_ms']['p50'])} | {_f(r.get('ttft_p50_vs_q0'), 2)} |")
    return out


def _pa_table(results: dict[str, Any]) -> list[str]:
    pa = results.get("perf_analyzer") or {}
    if not pa:
        return []
    if not pa.get("available"):
        return [f"perf_analyzer could not run here: {pa.get('reason')}"]
    out = ["| input | conc | req/s (timestamps) | infer/s (perf_analyzer) | p50 latency (ms) | p99 latency (ms) | "
           "TTFT p50 (ms) | ITL p50 (ms) | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in pa.get("runs", []):
        if r.get("ok"):
            lat = r["latency_us"]
            ex = r.get("from_export") or {}
            out.append(f"| {r['input']} | {r['concurrency']} | {_f(ex.get('throughput_rps'), 2)} | "
                       f"{_f(r['throughput_infer_per_s'], 2)} | "
                       f"{_f((lat.get('p50 latency') or 0) / 1e3)} | {_f((lat.get('p99 latency') or 0) / 1e3)} | "
                       f"{_f(ex.get('ttft_ms', {}).get('p50'))} | {_f(ex.get('itl_ms', {}).get('p50'), 2)} | ok |")
        else:
            out.append(f"| {r['input']} | {r['concurrency']} | — | — | — | — | — | — | {r.get('error')} |")
    return out


def render_readme(results: dict[str, Any]) -> str:
    """The results README: machine, command, targets, then one table per benchmark."""
    m = results.get("machine", {})
    pk = m.get("packages", {})
    stack = results.get("stack", {})
    lines = [
        "# Recorded benchmark results (cpu target)",
        "",
        "Written by `make bench` (`python -m benchmarks.run_all`); do not edit by hand. Plots: `*.png` here;",
        "raw numbers: `summary.json` and one JSON per benchmark. How to run the same on a GPU: docs/benchmarks.md.",
        "",
        f"- When: {results.get('time')} · total `make bench` wall time: {_f(results.get('wall_s'), 0)} s",
        f"- Command: `{results.get('command')}`",
        f"- Machine: {m.get('cpu_model')} · {m.get('nproc')} cores · {m.get('ram_gib')} GiB RAM · no GPU · "
        f"{m.get('os')} · Python {m.get('python')} · load average (1 min) at start "
        f"{_f((m.get('loadavg_1_5_15') or [None])[0], 2)}, at end {_f((m.get('loadavg_at_end') or [None])[0], 2)} "
        "(the machine is shared; a load above 2 means other processes competed for the cores)",
        f"- Versions: torch {pk.get('torch')}, numpy {pk.get('numpy')}, onnxruntime {pk.get('onnxruntime')}, "
        f"tritonserver from nvidia-pytriton {pk.get('nvidia-pytriton')}, tritonclient {pk.get('tritonclient')}, "
        f"openai {pk.get('openai')}, fastapi {pk.get('fastapi')}, uvicorn {pk.get('uvicorn')}",
        f"- Model: {stack.get('checkpoint_kind')} checkpoint (`{stack.get('checkpoint')}`), built with "
        "`nemovl-build engines --target cpu` + `nemovl-build repo`; clients, tritonserver and the frontend share "
        "the same cores, so absolute numbers are a floor, not a GPU forecast.",
        "",
        "## Targets",
        "",
        "```",
        *target_lines(results),
        "```",
        "",
    ]
    sections = (
        ("## Serving: (a) OpenAI endpoint vs (b) Triton direct",
         "Streaming, greedy, `ignore_eos`, fixed `max_tokens`; same requests on both paths. (a) = OpenAI SDK "
         "`AsyncOpenAI` → frontend → Triton; (b) = `tritonclient.grpc.aio` → Triton. ITL = (e2e − TTFT) / "
         "(tokens − 1) per request.", _serving_table(results)),
        ("## Frontend added latency = (a) − (b)",
         "Difference of the two paths' percentiles. At c=1 the paths take turns request by request, and "
         "the same HTTP requests are also sent from plain httpx (json.loads per SSE event) to show how much "
         "of (a) − (b) is the OpenAI SDK's own client-side parsing. At c>1 the two paths run one after the "
         "other, so for image and video (seconds per request, CPU-bound) the differences are mostly noise.",
         _overhead_table(results)),
        ("## Continuous batching", "Same prompts, every request generates exactly the same number of tokens.",
         _batching_table(results)),
        ("## EVS (video pruning rate q)", "Same clip, same sampled frames; TTFT through Triton direct.",
         _evs_table(results)),
        ("## perf_analyzer (gRPC streaming against `nemovl`)",
         "Inputs: `benchmarks/input_data/{text,image}.json` (16 tokens, `ignore_eos`); the exact command of "
         "each row is in perf_analyzer.json. req/s is computed from the profile export's timestamps (first "
         "send → last response), next to perf_analyzer's own Inferences/Second.",
         _pa_table(results)),
    )
    for title, text, table in sections:
        if table:
            lines += [title, "", text, "", *table, ""]
    parts = _preprocess_parts(results)
    if parts:
        lines += ["## Preprocessing (benchmarks/preprocess_bench.py)", "", "| part | input | target | numbers | result |",
                  "|---|---|---|---|---|"]
        for name, part in parts:
            what = part.get("image") or part.get("clip") or ""
            lines.append(f"| {name} | {what} | {part['target']} | {_numbers(part)} | "
                         f"{'PASS' if part['pass'] else 'FAIL'} |")
        lines.append("")
    errors = results.get("errors") or {}
    if errors:
        lines += ["## Sections that failed", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    return "\n".join(lines)


DOCS_START = "<!-- cpu-numbers:start (python -m benchmarks.report --update-docs) -->"
DOCS_END = "<!-- cpu-numbers:end -->"


def docs_summary(results: dict[str, Any]) -> str:
    """The compact 'recorded CPU numbers' block of docs/benchmarks.md: headline numbers and targets."""
    m = results.get("machine", {})
    serving = results.get("serving") or {}
    runs = serving.get("runs") or []
    lines = [f"Recorded {results.get('time')} on {m.get('cpu_model')} ({m.get('nproc')} cores, no GPU, load average "
             f"{_f((m.get('loadavg_1_5_15') or [None])[0], 1)} at start), "
             f"{(results.get('stack') or {}).get('checkpoint_kind')} checkpoint; `make bench` took "
             f"{_f(results.get('wall_s'), 0)} s.", ""]
    if runs:
        lines += ["| workload | conc | req/s (a) / (b) | TTFT p50 ms (a) / (b) | ITL p50 ms (a) / (b) | e2e p50 ms (a) / (b) |",
                  "|---|---|---|---|---|---|"]
        for r in runs:
            a, b = r["openai"], r["triton"]
            lines.append(f"| {r['workload']} | {r['concurrency']} | {_f(a['request_throughput_rps'], 2)} / "
                         f"{_f(b['request_throughput_rps'], 2)} | {_f(a['ttft_ms']['p50'])} / {_f(b['ttft_ms']['p50'])} | "
                         f"{_f(a['itl_ms']['p50'], 2)} / {_f(b['itl_ms']['p50'], 2)} | "
                         f"{_f(a['e2e_ms']['p50'])} / {_f(b['e2e_ms']['p50'])} |")
        lines += ["", "(a) = OpenAI SDK → `nemovl serve` → Triton; (b) = tritonclient gRPC → Triton.", ""]
    lines += ["Targets:", "", "```", *target_lines(results), "```"]
    evs = (results.get("evs") or {}).get("rates") or []
    if evs:
        lines += ["", "EVS (16-frame clip): " + "; ".join(
            f"q={r['q']}: {_f(r['prompt_tokens'], 0)} prompt tokens, TTFT p50 {_f(r['ttft_ms']['p50'], 0)} ms"
            for r in evs) + "."]
    return "\n".join(lines)


def update_docs(results: dict[str, Any], path: Any) -> bool:
    """Replace the block between DOCS_START and DOCS_END in `path` with docs_summary(results)."""
    from pathlib import Path

    doc = Path(path)
    text = doc.read_text(encoding="utf-8")
    if DOCS_START not in text or DOCS_END not in text:
        return False
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    doc.write_text(head + DOCS_START + "\n" + docs_summary(results) + "\n" + DOCS_END + tail, encoding="utf-8")
    return True


if __name__ == "__main__":
    import json
    import sys

    from benchmarks.common import REPO_ROOT, RESULTS_DIR

    summary = json.loads((RESULTS_DIR / "summary.json").read_text())
    if "--update-docs" in sys.argv:
        ok = update_docs(summary, REPO_ROOT / "docs" / "benchmarks.md")
        print("docs/benchmarks.md updated" if ok else "markers not found in docs/benchmarks.md")
    else:
        print(docs_summary(summary))
