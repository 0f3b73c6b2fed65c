"""`make bench`: every benchmark on the cpu target, results + plots under benchmarks/results/.

Order (servers start only for the parts that need them, so in-process parts are not disturbed):
1. build (or reuse) checkpoint → engines → Triton repository (benchmarks/stack.py);
2. preprocessing (benchmarks/preprocess_bench.py) and continuous batching on the reference engine,
   in this process;
3. tritonserver + the OpenAI frontend on 127.0.0.1: serving (text / image / video × concurrency 1, 4,
   16, both paths), batching through Triton, EVS, perf_analyzer.
Every request loop is bounded by a request count and a wall-clock budget. A failing section is
recorded under "errors" and the others still run; the exit status is 1 when any section failed.

`python -m benchmarks.run_all [--quick] [--only serving,evs,...] [--results-dir DIR]`
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import stack as stack_mod
from benchmarks.common import RESULTS_DIR, WORK_DIR, machine_info, utc_now, write_json

SECTIONS = ("preprocess", "video", "batching", "sampling", "serving", "evs", "perf_analyzer", "preprocess_scaling",
            "replicas", "aiperf", "faults")
# Benchmarks that start their own servers (run after the shared stack is stopped): section → module. Each has
# `run(quick: bool) -> dict` with a "targets" list (benchmarks/report.py listed_targets).
OWN_STACK_SECTIONS = {"preprocess_scaling": "benchmarks.preprocess_scaling_bench",
                      "replicas": "benchmarks.replicas_bench", "aiperf": "benchmarks.aiperf_bench",
                      "faults": "benchmarks.faults_bench"}


def _model_id(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def _preprocess_entry() -> Callable[..., dict[str, Any]]:
    """The entry function of benchmarks/preprocess_bench.py (owned by the preprocessing area)."""
    import importlib

    mod = importlib.import_module("benchmarks.preprocess_bench")
    for name in ("run", "bench_preprocess", "run_benchmark", "benchmark"):
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    raise RuntimeError("benchmarks/preprocess_bench.py has no entry function (run / bench_preprocess)")


def _section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    print(f"== {name} ...", flush=True)
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 — record and go on with the other sections
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        print(f"== {name} FAILED: {exc}", file=sys.stderr, flush=True)
        traceback.print_exc()
        value = None
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(f"== {name} done in {results['section_seconds'][name]} s", flush=True)
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description="Run every benchmark on the cpu target (make bench).")
    ap.add_argument("--quick", action="store_true", help="tiny request counts: a smoke run, not a measurement")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    out_dir: Path = args.results_dir
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "all", "time": utc_now(),
        "command": "make bench  # = " + shlex.join([".venv/bin/python", "-m", "benchmarks.run_all", *argv]),
        "quick": args.quick, "machine": machine_info(),
    }

    info = _section(results, "build", stack_mod.build)
    if info is None:
        return _finish(results, out_dir, t_start)
    results["stack"] = info.to_dict()
    print(f"   checkpoint: {info.checkpoint_kind} ({info.checkpoint})", flush=True)

    if "preprocess" in only:
        def _pre() -> dict[str, Any]:
            fn = _preprocess_entry()
            try:
                return fn(quick=args.quick)
            except TypeError:
                return fn()
        results["preprocess"] = _section(results, "preprocess", _pre)

    if "video" in only:  # frame sampling + decoding of the benchmark clips (in process)
        from benchmarks import video_bench

        results["video"] = _section(results, "video", lambda: video_bench.run(quick=args.quick))

    if "batching" in only:
        from benchmarks import batching_bench

        kw = {"max_new_tokens": 8, "requests_c1": 2, "requests_c8": 8} if args.quick else {}
        eng = _section(results, "batching-engine", lambda: batching_bench.bench_engine(info.checkpoint, **kw))
        results["batching"] = {"engine": eng}

    if "sampling" in only:  # constrained decoding cost, grammar compile time, n=4 vs 4 requests (in process)
        from benchmarks import sampling_bench

        results["sampling"] = _section(results, "sampling",
                                       lambda: sampling_bench.run(info.checkpoint, quick=args.quick))

    if only & {"serving", "evs", "perf_analyzer", "batching"}:
        _served_sections(results, info, only, args.quick)
    for name, module in OWN_STACK_SECTIONS.items():
        if name in only:
            results[name] = _section(results, name, lambda m=module: _module_run(m, args.quick))
    return _finish(results, out_dir, t_start)


def _module_run(module: str, quick: bool) -> dict[str, Any]:
    import importlib

    return importlib.import_module(module).run(quick=quick)


def _served_sections(results: dict[str, Any], info: stack_mod.BuildInfo, only: set[str], quick: bool) -> None:
    from nemovl_trt.triton.launcher import TritonServer

    def start() -> tuple[Any, Any]:
        t0 = time.perf_counter()
        triton = TritonServer(info.repo, engines_dir=info.engines, log_path=WORK_DIR / "tritonserver.log").start()
        t1 = time.perf_counter()
        try:
            fe = stack_mod.Frontend(triton.grpc_url).start()
        except BaseException:
            triton.stop()
            raise
        results["stack"]["startup_seconds"] = {"tritonserver": round(t1 - t0, 1),
                                               "frontend": round(time.perf_counter() - t1, 1)}
        results["stack"]["frontend_command"] = shlex.join(["nemovl", *fe.command()[1:]])
        results["stack"]["tritonserver_log"] = str(triton.log_path)
        return triton, fe

    servers = _section(results, "start-servers", start)
    if servers is None:
        return
    triton, fe = servers
    try:
        if "serving" in only:
            from benchmarks import serving_bench

            def _serving() -> dict[str, Any]:
                budget = serving_bench.QUICK if quick else serving_bench.Budget()
                return serving_bench.bench_serving(fe.base_url, _model_id(fe.base_url), triton.grpc_url,
                                                   concurrencies=(1, 2) if quick else serving_bench.CONCURRENCIES,
                                                   budget=budget, frontend_pid=fe.proc.pid)
            results["serving"] = _section(results, "serving", _serving)
        if "batching" in only:
            from benchmarks import batching_bench

            kw = {"max_new_tokens": 8, "requests_c1": 2, "requests_c8": 8} if quick else {}
            eng = (results.get("batching") or {}).get("engine") or {}
            results.setdefault("batching", {})["triton"] = _section(
                results, "batching-triton", lambda: batching_bench.bench_triton(
                    triton.grpc_url, engine_speedup=eng.get("speedup"), **kw))
        if "evs" in only:
            from benchmarks import evs_bench

            results["evs"] = _section(results, "evs",
                                      lambda: evs_bench.bench_evs(triton.grpc_url, repeats=1 if quick else 3))
        if "perf_analyzer" in only:
            from benchmarks import perf_analyzer

            kw = {"concurrencies": (1, 2), "request_count": 4, "image_request_count": 2} if quick else {}
            results["perf_analyzer"] = _section(results, "perf_analyzer",
                                                lambda: perf_analyzer.bench_perf_analyzer(triton.grpc_url, **kw))
    finally:
        fe.stop()
        triton.stop()


def _finish(results: dict[str, Any], out_dir: Path, t_start: float) -> int:
    from benchmarks import plots, report

    results["machine"]["loadavg_at_end"] = list(__import__("os").getloadavg())
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {k: results[k] for k in ("time", "command", "machine", "quick") if k in results}
    for name in ("serving", "batching", "evs", "perf_analyzer", "preprocess", "sampling", "video",
                 *OWN_STACK_SECTIONS):
        if results.get(name):
            write_json(out_dir / f"{name}.json", {"benchmark": name, **common, "stack": results.get("stack"),
                                                   **({"result": results[name]})})
    write_json(out_dir / "summary.json", results)
    try:
        pngs = plots.plot_all(results, out_dir)
    except Exception as exc:  # noqa: BLE001
        results.setdefault("errors", {})["plots"] = f"{type(exc).__name__}: {exc}"
        pngs = []
    (out_dir / "README.md").write_text(report.render_readme(results), encoding="utf-8")
    print("\n".join(report.target_lines(results)))
    if results.get("sampling"):
        from benchmarks import sampling_bench

        print("\n".join(sampling_bench.lines(results["sampling"])))
    print(f"results: {out_dir} ({len(pngs)} plots); make bench took {results['wall_s']:.0f} s")
    if results.get("errors"):
        print(f"sections that failed: {', '.join(results['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
