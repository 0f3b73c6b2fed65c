"""Pure translations between our request options and TensorRT-LLM's LLM API (no tensorrt_llm import).

Every name produced here is checked against TensorRT-LLM's own source in tests/test_upstream_contract.py
(upstream data: tests/data/upstream/tensorrt_llm.json). The design they follow is in docs/trtllm.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Our vision rows go to TensorRT-LLM under this modality key of `multi_modal_embeddings`: every row sits
# on an image-context token of the prompt, for images and (EVS-pruned) video frames alike, so the Nano VL
# model fuses them by that token id and never runs its own video EVS merge on them (docs/trtllm.md §3).
EMBEDDINGS_MODALITY = "image"

# Our finish reasons (docs/interfaces.md) for the ones TensorRT-LLM's CompletionOutput reports.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "cancelled", "timeout": "length"}


def sampling_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.SamplingParams` for our sampling options.

    opts: max_new_tokens (required), temperature (0 = greedy; a negative one is passed on for upstream to
    refuse), top_p, top_k (0 = off), seed (None = not
    set), stop_token_ids, ignore_eos. Greedy is sent as top_k=1 with top_p and temperature unset (upstream's
    `params_imply_greedy_decoding` is true for top_k == 1 whatever the other two; docs/trtllm.md §4)."""
    temperature = float(opts.get("temperature", 0.0) or 0.0)
    out: dict[str, Any] = {"max_tokens": int(opts["max_new_tokens"])}
    if temperature == 0.0:
        out["top_k"] = 1
    else:
        out["temperature"] = temperature
        top_p = float(opts.get("top_p", 1.0))
        top_k = int(opts.get("top_k", 0) or 0)
        if top_p < 1.0:
            out["top_p"] = top_p
        if top_k > 0:
            out["top_k"] = top_k
    seed = opts.get("seed")
    if seed is not None:
        out["seed"] = int(seed)
    stop = [int(t) for t in (opts.get("stop_token_ids") or ())]
    if stop:
        out["stop_token_ids"] = stop
        # upstream cuts a stop id from the output unless told otherwise; the reference engine emits it
        out["include_stop_str_in_output"] = True
    if opts.get("ignore_eos"):
        out["ignore_eos"] = True
    return out


def prompt_inputs(input_ids: list[int], mm_embeddings: Any | None) -> dict[str, Any]:
    """The `inputs` dict for `LLM.generate_async`: the prompt ids as built by our preprocessor, plus our
    vision rows as `multi_modal_embeddings` = {"image": [tensor [M, hidden]]} when there are any.
    `mm_embeddings` is a torch tensor already in the model's dtype (see `embeddings_tensor`)."""
    inputs: dict[str, Any] = {"prompt_token_ids": [int(t) for t in input_ids]}
    if mm_embeddings is not None and int(mm_embeddings.shape[0]) > 0:
        inputs["multi_modal_embeddings"] = {EMBEDDINGS_MODALITY: [mm_embeddings]}
    return inputs


def embeddings_tensor(arr: np.ndarray | None, dtype_name: str) -> Any | None:
    """numpy [M, hidden] (float32 from the vision plan) → a contiguous CPU torch tensor in the model's
    dtype (`torch_dtype` of the bundle's config, e.g. "bfloat16"); None for no rows. CPU, not CUDA:
    TensorRT-LLM ships request tensors to its worker through shared memory."""
    if arr is None or arr.size == 0:
        return None
    import torch

    if arr.ndim != 2:
        raise ValueError(f"vision embeddings must be [rows, hidden], got shape {list(arr.shape)}.")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(getattr(torch, dtype_name)).contiguous()


def finish_reason(reason: Any) -> str:
    """Our finish reason for a CompletionOutput.finish_reason (None → "stop" for a finished output)."""
    if reason is None:
        return "stop"
    return FINISH_REASONS.get(str(reason), "stop")


def count_image_context(input_ids: list[int], img_context_token_id: int) -> int:
    """How many embedding rows a prompt expects."""
    return sum(1 for t in input_ids if t == img_context_token_id)
