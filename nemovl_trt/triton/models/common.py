"""Helpers shared by the Triton Python models (no `triton_python_backend_utils` import here, so this module
can be imported and tested outside the stub)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nemovl_trt.triton.interface import ENGINES_DIR_PARAMETER

ENGINES_ENV = "NEMOVL_ENGINES_DIR"
MANIFEST_FILE = "manifest.json"


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """`parameters` of the model's config (from the `args` Triton passes to `initialize`)."""
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}


def resolve_engines_dir(args: dict[str, Any]) -> Path:
    """The engines directory: $NEMOVL_ENGINES_DIR when set, else the `engines_dir` parameter, which is
    relative to the model repository root when not absolute."""
    env = os.environ.get(ENGINES_ENV)
    if env:
        return Path(env).resolve()
    value = model_parameters(args).get(ENGINES_DIR_PARAMETER, "")
    if not value:
        raise RuntimeError(f"the model has no '{ENGINES_DIR_PARAMETER}' parameter and {ENGINES_ENV} is not set.")
    path = Path(value)
    if not path.is_absolute():
        repo_root = Path(args["model_repository"]).resolve().parent
        path = (repo_root / path).resolve()
    if not (path / MANIFEST_FILE).is_file():
        raise RuntimeError(f"engines directory {path} has no {MANIFEST_FILE}; set {ENGINES_ENV} or the "
                           f"'{ENGINES_DIR_PARAMETER}' parameter.")
    return path


def read_manifest(engines_dir: Path) -> dict[str, Any]:
    """The build manifest of an engines directory."""
    return json.loads((engines_dir / MANIFEST_FILE).read_text(encoding="utf-8"))


def bytes_scalar(arr: np.ndarray | None) -> bytes | None:
    """The single element of a BYTES tensor as bytes (None when the tensor is absent or empty)."""
    if arr is None or arr.size == 0:
        return None
    v = arr.reshape(-1)[0]
    return v if isinstance(v, bytes) else str(v).encode()


def json_input(arr: np.ndarray | None, default: Any) -> Any:
    """Decode a BYTES[1] JSON tensor; empty/absent → `default`. Raises ValueError for bad JSON."""
    raw = bytes_scalar(arr)
    if raw is None or not raw.strip():
        return default
    return json.loads(raw.decode("utf-8"))


def bytes_tensor(value: str | bytes) -> np.ndarray:
    """A BYTES[1] numpy array."""
    return np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=np.object_)
