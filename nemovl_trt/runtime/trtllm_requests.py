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


class UnsupportedOnTrtllm(ValueError):
    """A request option TensorRT-LLM (or our generator) cannot honour; the message starts with the error
    code the frontend maps to a 400 (`[unsupported_parameter] ...`)."""


def _refuse(what: str, why: str) -> UnsupportedOnTrtllm:
    return UnsupportedOnTrtllm(f"[unsupported_parameter] {what} is not supported on TensorRT-LLM targets: {why}.")


def _guided(spec: dict[str, Any], guided_params: Any) -> Any:
    """Our structured-output spec (`model.grammar`) → `GuidedDecodingParams` (json / json_object)."""
    if spec.get("reasoning"):
        raise _refuse("structured output after a thinking block (/think)",
                      "GuidedDecodingParams constrains from the first token")
    kind = spec.get("type")
    if kind == "json_schema":
        kwargs = {"json": spec.get("schema", {})}
    elif kind == "json_object":
        kwargs = {"json_object": True}
    else:
        raise _refuse("a forced tool call (tool_choice 'required' or a named function)",
                      "it needs a grammar over the model's <TOOLCALL> special tokens, which GuidedDecodingParams "
                      "cannot name portably across its backends")
    if guided_params is None:
        from tensorrt_llm.sampling_params import GuidedDecodingParams as guided_params  # noqa: N813
    return guided_params(**kwargs)


def _embedding_bias(bias: dict[str, float], vocab_size: Any) -> Any:
    """OpenAI's logit_bias {id: bias} → upstream's embedding_bias, a float32 tensor [vocab] added to the logits."""
    import torch

    if not vocab_size:
        raise _refuse("logit_bias", "the request did not carry the vocabulary size")
    out = torch.zeros(int(vocab_size), dtype=torch.float32)
    for k, v in bias.items():
        out[int(k)] = float(v)
    return out


def sampling_kwargs(opts: dict[str, Any], guided_params: Any = None) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.SamplingParams` for our sampling options.

    opts: max_new_tokens (required), temperature (0 = greedy; a negative one is passed on for upstream to
    refuse), top_p, top_k (0 = off), seed (None = not set), stop_token_ids, ignore_eos, frequency_penalty,
    presence_penalty, repetition_penalty, logit_bias {id: bias} (+ vocab_size), guided (a structured-output
    spec), n, logprobs, prompt_logprobs. Greedy is sent as top_k=1 with top_p and temperature unset
    (upstream's `params_imply_greedy_decoding` is true for top_k == 1 whatever the other two; docs/trtllm.md
    §4). `guided_params` is the GuidedDecodingParams class (imported from tensorrt_llm when None).
    Refused with UnsupportedOnTrtllm ("[unsupported_parameter] ..."): n > 1 and logprobs (TrtllmGenerator
    streams only `outputs[0].token_ids`), forced tool calls and structured output after reasoning."""
    if int(opts.get("n") or 1) > 1:
        raise _refuse("n > 1", "the generator streams only the first CompletionOutput")
    if opts.get("logprobs") is not None or opts.get("prompt_logprobs") is not None:
        raise _refuse("logprobs", "the generator does not forward CompletionOutput.logprobs")
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
    for key in ("frequency_penalty", "presence_penalty"):
        if opts.get(key):
            out[key] = float(opts[key])
    if opts.get("repetition_penalty") not in (None, 1, 1.0):
        out["repetition_penalty"] = float(opts["repetition_penalty"])
    if opts.get("logit_bias"):
        out["embedding_bias"] = _embedding_bias(opts["logit_bias"], opts.get("vocab_size"))
    if opts.get("guided"):
        out["guided_decoding"] = _guided(opts["guided"], guided_params)
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
