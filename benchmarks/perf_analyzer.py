"""perf_analyzer against the `nemovl` entry model: fetch the binary, write the `--input-data` JSON
files, run streaming gRPC load at several concurrencies, and parse the CSV + profile export.

The binary comes from the tritonclient 2.50.0 wheel (scripts/fetch_perf_analyzer.sh; it needs
libb64-0d and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel, no GPU). If it cannot be fetched
or run, the result says why instead of failing the whole benchmark.

Input data (benchmarks/input_data/): BYTES tensors are given as
`{"content": ["<string>"], "shape": [1]}`; the image is raw JPEG bytes, so it goes in as
`{"b64": base64(<serialized BYTES tensor>), "shape": [1]}` where the serialized tensor is Triton's wire
format (a 4-byte little-endian length, then the bytes, per element).

Run alone: `python -m benchmarks.perf_analyzer --triton HOST:PORT`.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, make_jpeg, summarize, utc_now, write_json

INPUT_DIR = REPO_ROOT / "benchmarks" / "input_data"
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch_perf_analyzer.sh"
CONCURRENCIES = (1, 2, 4)
IMAGE = {"width": 1024, "height": 512}  # 2×1 tiles + thumbnail, as in serving_bench
MAX_TOKENS = 16


def serialize_bytes_tensor(elements: list[bytes]) -> bytes:
    """Triton's raw BYTES tensor layout: for each element, uint32 little-endian length then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _string_tensor(value: Any) -> dict[str, Any]:
    return {"content": [value if isinstance(value, str) else json.dumps(value)], "shape": [1]}


def input_data(kind: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """The perf_analyzer JSON for `kind` = "text" or "image": one request, greedy, fixed length."""
    params = {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0, "ignore_eos": True}
    if kind == "text":
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "Write a short story about a robot who learns to paint."}]}]
        return {"data": [{"messages": _string_tensor(messages), "params": _string_tensor(params)}]}
    if kind == "image":
        messages = [{"role": "user", "content": [
            {"type": "image", "index": 0}, {"type": "text", "text": "Describe this image in detail."}]}]
        jpeg = make_jpeg(**IMAGE)
        images = {"b64": base64.b64encode(serialize_bytes_tensor([jpeg])).decode("ascii"), "shape": [1]}
        return {"data": [{"messages": _string_tensor(messages), "images": images,
                          "params": _string_tensor(params)}]}
    raise ValueError(f"unknown input kind '{kind}' (text or image)")


def write_input_data(out_dir: Path = INPUT_DIR, max_tokens: int = MAX_TOKENS) -> dict[str, Path]:
    """Write text.json and image.json (deterministic content) and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in ("text", "image"):
        path = out_dir / f"{kind}.json"
        path.write_text(json.dumps(input_data(kind, max_tokens), indent=1) + "\n", encoding="utf-8")
        paths[kind] = path
    return paths


def fetch(timeout_s: float = 300.0) -> Path:
    """Run scripts/fetch_perf_analyzer.sh (idempotent) and return the wrapper's path.

    Raises RuntimeError with the script's last error lines when it fails.
    """
    proc = subprocess.run(["bash", str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO_ROOT)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)[-800:]
        raise RuntimeError(f"fetch_perf_analyzer.sh failed (exit {proc.returncode}): {tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


def command(binary: Path, triton_url: str, data_file: Path, concurrency: int, csv_path: Path,
            export_path: Path, request_count: int, model: str = "nemovl") -> list[str]:
    """The perf_analyzer command line: gRPC streaming, a fixed number of measured requests."""
    return [str(binary), "-m", model, "-i", "grpc", "-u", triton_url, "--streaming",
            "--input-data", str(data_file), "--concurrency-range", f"{concurrency}:{concurrency}",
            "--request-count", str(request_count), "--measurement-request-count", str(request_count),
            "-f", str(csv_path), "--profile-export-file", str(export_path)]


def parse_csv(csv_path: Path) -> dict[str, float]:
    """perf_analyzer's CSV (one row per concurrency) → {column: value} of the first data row;
    latencies stay in µs as perf_analyzer writes them."""
    lines = [line for line in csv_path.read_text().splitlines() if line.strip()]
    header, row = lines[0].split(","), lines[1].split(",")
    out: dict[str, float] = {}
    for key, value in zip(header, row, strict=False):
        try:
            out[key.strip()] = float(value)
        except ValueError:
            continue
    return out


def parse_export(export_path: Path) -> dict[str, Any]:
    """TTFT / ITL / e2e (ms) and request throughput (first send → last response) from the profile export's
    request and response timestamps (ns)."""
    data = json.loads(export_path.read_bytes().decode("utf-8", "replace"))
    ttft, itl, e2e, responses = [], [], [], []
    first_send, last_response = None, None
    for exp in data.get("experiments", []):
        for req in exp.get("requests", []):
            t0 = req.get("timestamp")
            stamps = sorted(req.get("response_timestamps") or [])
            if t0 is None or not stamps:
                continue
            first_send = t0 if first_send is None else min(first_send, t0)
            last_response = stamps[-1] if last_response is None else max(last_response, stamps[-1])
            ttft.append((stamps[0] - t0) / 1e6)
            e2e.append((stamps[-1] - t0) / 1e6)
            responses.append(len(stamps))
            if len(stamps) > 1:
                itl.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) / 1e6)
    span_s = (last_response - first_send) / 1e9 if first_send is not None and last_response is not None else None
    return {"requests": len(e2e), "responses_per_request_mean": sum(responses) / len(responses) if responses
            else None, "span_s": span_s, "throughput_rps": len(e2e) / span_s if span_s else None,
            "ttft_ms": summarize(ttft), "itl_ms": summarize(itl), "e2e_ms": summarize(e2e)}


def run_one(binary: Path, triton_url: str, kind: str, data_file: Path, concurrency: int, request_count: int,
            timeout_s: float) -> dict[str, Any]:
    """One perf_analyzer run; returns the parsed numbers, or the error and output tail."""
    with tempfile.TemporaryDirectory(prefix="pa-") as tmp:
        csv_path, export_path = Path(tmp) / "out.csv", Path(tmp) / "export.json"
        cmd = command(binary, triton_url, data_file, concurrency, csv_path, export_path, request_count)
        shown = " ".join(["perf_analyzer", *cmd[1:]]).replace(str(csv_path), "out.csv") \
            .replace(str(export_path), "export.json").replace(str(REPO_ROOT) + "/", "")
        row: dict[str, Any] = {"input": kind, "concurrency": concurrency, "command": shown}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**row, "ok": False, "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not csv_path.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
            return {**row, "ok": False, "error": f"exit {proc.returncode}", "output_tail": tail}
        csv = parse_csv(csv_path)
        row.update({"ok": True, "throughput_infer_per_s": csv.get("Inferences/Second"),
                    "latency_us": {k: csv.get(k) for k in ("Avg latency", "p50 latency", "p90 latency",
                                                            "p99 latency") if k in csv},
                    "csv": csv})
        if export_path.exists():
            row["from_export"] = parse_export(export_path)
        return row


def bench_perf_analyzer(triton_url: str, concurrencies: tuple[int, ...] = CONCURRENCIES,
                        request_count: int = 16, image_request_count: int = 8,
                        timeout_s: float = 120.0) -> dict[str, Any]:
    """Fetch perf_analyzer and run text and image inputs at each concurrency.

    Returns {"available": False, "reason": ...} when the binary cannot be fetched or started.
    """
    try:
        binary = fetch()
        probe = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        if "Perf Analyzer" not in probe.stdout + probe.stderr:
            raise RuntimeError(f"the binary does not start: {(probe.stdout + probe.stderr).strip()[-300:]}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "reason": str(exc)}
    files = write_input_data()
    counts = {"text": request_count, "image": image_request_count}
    for kind in ("text", "image"):  # warm-up (discarded): first requests pay one-time costs in the models
        run_one(binary, triton_url, kind, files[kind], 1, 2, timeout_s)
    runs = [run_one(binary, triton_url, kind, files[kind], c, max(counts[kind], c), timeout_s)
            for kind in ("text", "image") for c in concurrencies]
    for r in runs:
        status = f"{r['throughput_infer_per_s']:.2f} infer/s" if r["ok"] else f"FAILED: {r['error']}"
        print(f"[perf_analyzer] {r['input']:5s} c={r['concurrency']}: {status}", flush=True)
    return {"available": True, "binary": str(binary.relative_to(REPO_ROOT)) if binary.is_relative_to(REPO_ROOT)
            else str(binary), "tritonclient_wheel": "2.50.0", "request_count": request_count,
            "image_request_count": image_request_count, "max_tokens": MAX_TOKENS, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton", default=None, help="HOST:PORT of Triton's gRPC endpoint")
    ap.add_argument("--write-input-data", action="store_true", help="only (re)write the input-data JSON files")
    ap.add_argument("--input-dir", type=Path, default=INPUT_DIR, help="where --write-input-data writes")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="max_tokens in the written params")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "perf_analyzer.json")
    args = ap.parse_args(argv)
    if args.write_input_data:
        for path in write_input_data(args.input_dir, args.max_tokens).values():
            print(path)
        return 0
    if not args.triton:
        ap.error("--triton is required unless --write-input-data is given")
    result = {"benchmark": "perf_analyzer", "time": utc_now(), "machine": machine_info(),
              **bench_perf_analyzer(args.triton)}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
