"""Shared helpers of the benchmarks: statistics, machine info, synthetic media, result files.

Everything here is deterministic given its arguments (media are generated, never downloaded), so two
runs of `make bench` send byte-identical requests.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import io
import json
import math
import os
import platform
import socket
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
WORK_DIR = REPO_ROOT / ".cache" / "bench"

# Packages whose versions are recorded next to every result.
_VERSIONED_PACKAGES = (
    "nemovl-trt", "torch", "numpy", "onnxruntime", "tokenizers", "tritonclient", "nvidia-pytriton",
    "grpcio", "fastapi", "uvicorn", "openai", "httpx", "av", "simplejpeg", "matplotlib",
)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """Percentile summary of `values` multiplied by `scale` (e.g. 1e3 for seconds → ms).

    Returns {"n", "mean", "p50", "p90", "p99", "min", "max"}; the statistics are None when `values` is empty.
    Percentiles use linear interpolation (numpy's default), so p99 of fewer than 100 samples lies
    between the two largest values.
    """
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64) * scale
    if arr.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "n": int(arr.size), "mean": float(arr.mean()), "p50": float(p50), "p90": float(p90),
        "p99": float(p99), "min": float(arr.min()), "max": float(arr.max()),
    }


def _read_first(path: str, prefix: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    """The checked-out commit, read from .git without running git."""
    head_path = REPO_ROOT / ".git" / "HEAD"
    try:
        head = head_path.read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        ref_file = REPO_ROOT / ".git" / ref
        if ref_file.exists():
            return ref_file.read_text().strip()
        packed = REPO_ROOT / ".git" / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


def package_versions() -> dict[str, str | None]:
    """Installed version of each benchmarked package (None when absent)."""
    out: dict[str, str | None] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """Facts about the machine a result was measured on: CPUs, RAM, OS, Python, versions, load."""
    mem_kb = _read_first("/proc/meminfo", "MemTotal")
    ram_gib = round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor(),
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "gpu": None,
        "loadavg_1_5_15": list(os.getloadavg()),
        "git_commit": _git_commit(),
        "packages": package_versions(),
    }


def print_targets(targets: Sequence[dict[str, Any]], flush: bool = False) -> None:
    """Print one `PASS|FAIL  name: detail` line per target (the `main()` of a benchmark module)."""
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {t['detail']}", flush=flush)


def utc_now() -> str:
    """The current UTC time as an ISO 8601 string with seconds."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON (keys in insertion order) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pattern_frame(width: int, height: int, t: int) -> np.ndarray:
    """A deterministic RGB test pattern (uint8 [H, W, 3]) that moves with the frame index t.

    Half of the picture is a static background, the other half a moving gradient, so consecutive
    video frames share some tokens (what EVS prunes) and differ in others.
    """
    yy, xx = np.mgrid[0:height, 0:width]
    r = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
    g = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
    b = (((xx // 16 + yy // 16) % 2) * 200).astype(np.uint8)
    frame = np.stack([r, g, b], axis=-1)
    moving = (xx >= width // 2)
    shift = (xx + 8 * t) % 256
    frame[moving, 0] = shift[moving].astype(np.uint8)
    frame[moving, 1] = (255 - shift[moving]).astype(np.uint8)
    return frame


def make_jpeg(width: int, height: int, quality: int = 90) -> bytes:
    """Encode a deterministic test pattern of `width`×`height` pixels as JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_pattern_frame(width, height, 0)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_mp4(width: int, height: int, fps: int, num_frames: int) -> bytes:
    """Encode `num_frames` moving test-pattern frames at `fps` as an H.264 MP4 (bytes).

    Width and height must be even (yuv420p). Every frame is a keyframe-independent encode of the
    pattern at time t, with a GOP of `fps` frames.
    """
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_pattern_frame(width, height, t), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
