"""Vision encoder ONNX → TensorRT plan (GPU targets only). Thin, real calls into the `tensorrt` Python API.

Import-guarded: `tensorrt` and a CUDA device are looked up only when a GPU target is built; when either is
missing, or the GPU's compute capability differs from the target's architecture, `GpuUnavailable` carries the
one-line message the CLI prints ("target h100 needs an NVIDIA GPU (sm90) and TensorRT; none found").
Not exercised in CI (no GPU there); the ONNX it consumes is checked on ONNX Runtime first.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemovl_trt.build.targets import TargetConfig

WORKSPACE_BYTES = 4 * 2**30  # builder scratch memory limit


class GpuUnavailable(RuntimeError):
    """A build step needs a GPU of the target's architecture (and its library), and this machine has none."""


def gpu_message(target: TargetConfig, what: str = "TensorRT") -> str:
    return f"target {target.name} needs an NVIDIA GPU ({target.arch}) and {what}; none found"


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of CUDA device 0, or None when there is no usable CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


def require_gpu(target: TargetConfig, module: str, what: str) -> Any:
    """Import `module` and check that device 0 has the target's compute capability; returns the module.
    Raises `GpuUnavailable` with the one-line message otherwise."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise GpuUnavailable(gpu_message(target, what)) from None
    cap = cuda_capability()
    if cap is None or cap != target.capability:
        found = "none found" if cap is None else f"found sm{cap[0]}{cap[1]}"
        raise GpuUnavailable(f"target {target.name} needs an NVIDIA GPU ({target.arch}) and {what}; {found}")
    return mod


@dataclass(frozen=True)
class TrtProfile:
    """Tile counts of the single optimization profile: min / opt / max tiles per batch."""

    min_tiles: int
    opt_tiles: int
    max_tiles: int


def build_vision_engine(target: TargetConfig, onnx_path: Path, plan_path: Path, timing_cache: Path,
                        input_name: str, tile_side: int, profile: TrtProfile) -> Path:
    """Parse `onnx_path` into a STRONGLY_TYPED network (precisions come from the graph), add one optimization
    profile for `input_name` [tiles,3,side,side], reuse/update `timing_cache`, and write the serialized plan."""
    trt = require_gpu(target, "tensorrt", "TensorRT")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    shape = (3, tile_side, tile_side)
    opt_profile.set_shape(input_name, (profile.min_tiles, *shape), (profile.opt_tiles, *shape),
                          (profile.max_tiles, *shape))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name}.")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


def tensorrt_version() -> str | None:
    """Installed TensorRT version, or None."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)
