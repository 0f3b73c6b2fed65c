"""Choose and start the LLM engine of a build: the reference batcher (cpu) or TensorRT-LLM (GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemovl_trt.runtime.engine_api import STREAM_INTERVAL, STREAM_INTERVAL_MIN_BATCH, LlmEngine

ENGINE_KINDS = ("reference", "tensorrt_llm_pytorch")  # manifest llm.engine values


def load_engine(kind: str, llm_dir: Path, max_batch_size: int, llm_api_options: dict[str, Any] | None = None,
                dtype: str | None = None, stream_interval: int = STREAM_INTERVAL,
                stream_interval_min_batch: int = STREAM_INTERVAL_MIN_BATCH) -> LlmEngine:
    """Start the engine named by the build manifest's `llm.engine`.

    kind "reference": the PyTorch reference on the checkpoint in `llm_dir` (`dtype` overrides its dtype; a
    choice's tokens are sent every `stream_interval` tokens while at least `stream_interval_min_batch` sequences
    run).
    kind "tensorrt_llm_pytorch": TensorRT-LLM's LLM API on the bundle in `llm_dir` with `llm_api_options`
    (the bundle's llm_api_options.yaml); needs tensorrt_llm and a GPU (one clear RuntimeError otherwise)."""
    if kind == "reference":
        from nemovl_trt.runtime.reference_batcher import build_reference_batcher

        return build_reference_batcher(llm_dir, max_batch_size, dtype=dtype, stream_interval=stream_interval,
                                       stream_interval_min_batch=stream_interval_min_batch)
    if kind == "tensorrt_llm_pytorch":
        from nemovl_trt.runtime.trtllm_generator import TrtllmGenerator

        return TrtllmGenerator(llm_dir, dict(llm_api_options or {}))
    raise ValueError(f"unknown LLM engine {kind!r} in the build manifest; expected one of {', '.join(ENGINE_KINDS)}.")
