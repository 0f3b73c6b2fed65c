"""`manifest.json`: the one file the Triton repository generator reads from an engines dir.

It records the target, tool versions, input (checkpoint) and output file hashes, precisions, limits, the
parallel layout (world size), the serving instance counts, the memory plan, the ONNX check result and the paths
(relative to the engines dir) of every artifact.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from nemovl_trt.build.targets import TargetConfig

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2  # 2: + "parallel", "serving"
DEFAULT_MODEL_ID = "nvidia/nemotron-nano-12b-v2-vl"
REQUIRED_KEYS = ("manifest_version", "model_id", "target", "precisions", "limits", "parallel", "serving", "paths",
                 "vision", "llm", "plan", "onnx_check", "tool_versions", "inputs", "outputs")
HASH_CHUNK = 1 << 22


class ManifestError(ValueError):
    """manifest.json is missing or incomplete."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str | None]:
    """Versions of the tools that produced the engines (None when not installed)."""
    out: dict[str, str | None] = {}
    for dist in ("nemovl-trt", "torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_llm", "nvidia-modelopt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def parallel_section(target: TargetConfig) -> dict[str, int]:
    """`manifest["parallel"]`: the TensorRT-LLM layout of one replica (the sizes in llm_api_options.yaml)."""
    par = target.parallel
    return {"tensor_parallel_size": par.tensor_parallel, "pipeline_parallel_size": par.pipeline_parallel,
            "world_size": par.world_size}


def serving_section(target: TargetConfig) -> dict[str, int]:
    """`manifest["serving"]`: Triton instance counts and the llm's stream interval from the target's
    `serving:` section."""
    srv = target.serving
    return {"preprocessor_instances": srv.preprocessor_instances, "vision_instances": srv.vision_instances,
            "stream_interval": srv.stream_interval, "stream_interval_min_batch": srv.stream_interval_min_batch}


def write_manifest(engines_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write `engines_dir/manifest.json` (sorted keys, stable bytes)."""
    path = engines_dir / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_manifest(engines_dir: str | Path) -> dict[str, Any]:
    """Read and check `manifest.json` of an engines dir; every path it names must exist."""
    root = Path(engines_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} does not exist; run `nemovl-build engines` first.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}).") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ManifestError(f"{path} lacks the keys {missing}.")
    if data["manifest_version"] != MANIFEST_VERSION:
        raise ManifestError(f"{path} has manifest_version {data['manifest_version']}, expected {MANIFEST_VERSION}.")
    for key, rel in data["paths"].items():
        if rel is not None and not (root / rel).exists():
            raise ManifestError(f"{path} names {key} '{rel}', which does not exist in {root}.")
    return data
