"""Pure translations between our request options and TensorRT-LLM's LLM API (no tensorrt_llm import).

Every name produced here is checked against TensorRT-LLM's own source in tests/test_upstream_contract.py
(upstream data: tests/data/upstream/tensorrt_llm.json). The design they follow is in docs/trtllm.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nemovl_trt.model.sampling import GREEDY_TEMPERATURE

# Our vision rows go to TensorRT-LLM under this modality key of `multi_modal_embeddings`: every row sits
# on an image-context token of the prompt, for images and (EVS-pruned) video frames alike, so the Nano VL
# model fuses them by that token id and never runs its own video EVS merge on them (docs/trtllm.md §3).
EMBEDDINGS_MODALITY = "image"

# Our finish reasons (docs/interfaces.md) for the ones TensorRT-LLM's CompletionOutput reports.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "cancelled", "timeout": "length"}


SEED_MODULUS = 2 ** 64  # upstream's seed reaches the runtime as RandomSeedType = std::uint64_t
LOGPROB_FLOOR = -9999.0  # what trtllm-serve reports for -inf (JSON has no infinity)
GRAMMAR_BACKENDS = ("llguidance", "xgrammar")  # TorchLlmArgs.guided_decoding_backend values we map


class UnsupportedOnTrtllm(ValueError):
    """A request option TensorRT-LLM (or our generator) cannot honour; the message starts with the error
    code the frontend maps to a 400 (`[unsupported_parameter] ...`)."""


def _refuse(what: str, why: str) -> UnsupportedOnTrtllm:
    return UnsupportedOnTrtllm(f"[unsupported_parameter] {what} is not supported on TensorRT-LLM targets: {why}.")


@dataclass(frozen=True)
class ChoiceLayout:
    """How our `n` / `best_of` become upstream sequences.

    n: choices the requester gets; upstream_n / upstream_best_of: SamplingParams.n / best_of; copies: how
    many of our choices each upstream output feeds (greedy decoding: upstream refuses best_of > 1, and every
    greedy choice is the same sequence, so one sequence is generated and sent as all n choices); ranked:
    upstream generates best_of > n and keeps the n with the highest cumulative logprob (its `outputs`
    re-sorts and re-indexes on every access, so a ranked request is sent when it has finished)."""

    n: int
    upstream_n: int
    upstream_best_of: int | None
    copies: int

    @property
    def ranked(self) -> bool:
        return self.upstream_best_of is not None


def _is_greedy_temperature(temperature: float) -> bool:
    """0 and the tiny temperatures the cpu engine also treats as greedy (model/sampling.GREEDY_TEMPERATURE:
    logits / 1e-38 overflow); a negative one is passed on for upstream to refuse."""
    return 0.0 <= temperature < GREEDY_TEMPERATURE


def _greedy(opts: dict[str, Any]) -> bool:
    return _is_greedy_temperature(float(opts.get("temperature", 0.0) or 0.0))


def choice_layout(opts: dict[str, Any]) -> ChoiceLayout:
    """The upstream sequences of a request's `n` (default 1) and `best_of` (default n; must be >= n)."""
    n = max(1, int(opts.get("n") or 1))
    best_of = int(opts.get("best_of") or n)
    if best_of < n:
        raise UnsupportedOnTrtllm(f"[invalid_parameter] best_of ({best_of}) must be at least n ({n}).")
    if _greedy(opts):
        return ChoiceLayout(n=n, upstream_n=1, upstream_best_of=None, copies=n)
    return ChoiceLayout(n=n, upstream_n=n, upstream_best_of=best_of if best_of > n else None, copies=1)


def _upstream_topk(k: Any) -> int:
    """Upstream's `logprobs` / `prompt_logprobs` for our k >= 0 alternatives. At b35ac1b6 the PyTorch
    backend turns logprobs on with bool(logprobs) (0 = off), at 1f064c46 0 means "the sampled token only":
    asking for at least 1 gets the chosen token's logprob from both; extra alternatives are cut in
    `token_logprobs`."""
    return max(1, int(k))


def _guided(spec: dict[str, Any], guided_params: Any, backend: str, special_ids: dict[str, int] | None) -> Any:
    """Our structured-output spec (`model.grammar`) → `GuidedDecodingParams`.

    llguidance backend: `grammar=` our own Lark grammar (the cpu engine's text, special tokens by id), which
    upstream's LLGuidanceMatcherFactory compiles with `LLMatcher.grammar_from_lark`: JSON schema, JSON
    object, forced tool calls (<TOOLCALL> special tokens) and a thinking block first all work, with the
    same compact JSON as the cpu engine. xgrammar backend: `json=` / `json_object=` only."""
    from nemovl_trt.model.grammar import THINK_CLOSE, TOOL_CLOSE, TOOL_OPEN, GrammarError, grammar_text

    if guided_params is None:
        from tensorrt_llm.sampling_params import GuidedDecodingParams as guided_params  # noqa: N813
    kind = spec.get("type")
    if backend == "llguidance":
        needed = ({TOOL_OPEN, TOOL_CLOSE} if kind == "tool_calls" else set()) | (
            {THINK_CLOSE} if spec.get("reasoning") else set())
        missing = sorted(needed - set(special_ids or {}))
        if missing:
            raise _refuse("this structured output", f"the bundle's tokenizer has no {', '.join(missing)} token")
        try:
            return guided_params(grammar=grammar_text(spec, dict(special_ids or {})))
        except GrammarError as e:
            raise UnsupportedOnTrtllm(f"[invalid_json_schema] {e.message}") from None
    if backend != "xgrammar":
        raise _refuse(f"guided_decoding_backend {backend!r}", f"use one of {', '.join(GRAMMAR_BACKENDS)}")
    if spec.get("reasoning"):
        raise _refuse("structured output after a thinking block (/think) with the xgrammar backend",
                      "json / json_object constrain from the first token (the llguidance backend can)")
    if kind == "json_schema":
        return guided_params(json=spec.get("schema", {}))
    if kind == "json_object":
        return guided_params(json_object=True)
    raise _refuse("a forced tool call (tool_choice 'required' or a named function) with the xgrammar backend",
                  "it needs a grammar over the model's <TOOLCALL> special tokens (the llguidance backend has one)")


def _embedding_bias(bias: dict[str, float], vocab_size: Any) -> Any:
    """OpenAI's logit_bias {id: bias} → upstream's embedding_bias, a float32 tensor [vocab] added to the logits."""
    import torch

    if not vocab_size:
        raise _refuse("logit_bias", "the request did not carry the vocabulary size")
    out = torch.zeros(int(vocab_size), dtype=torch.float32)
    for k, v in bias.items():
        out[int(k)] = float(v)
    return out


def sampling_kwargs(opts: dict[str, Any], guided_params: Any = None, *, grammar_backend: str = "llguidance",
                    special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.SamplingParams` for our sampling options.

    opts: max_new_tokens (required), temperature (below GREEDY_TEMPERATURE = greedy; a negative one is passed on for upstream to
    refuse), top_p, top_k (0 = off), seed (None = not set; any int64, sent modulo 2**64), stop_token_ids,
    ignore_eos, frequency_penalty, presence_penalty, repetition_penalty, logit_bias {id: bias} (+
    vocab_size), guided (a structured-output spec), n, best_of, logprobs, prompt_logprobs. Greedy is sent as
    top_k=1 with top_p and temperature unset (upstream's `params_imply_greedy_decoding` is true for top_k == 1
    whatever the other two; docs/trtllm.md §4); n and best_of follow `choice_layout`. `guided_params` is the
    GuidedDecodingParams class (imported from tensorrt_llm when None), `grammar_backend` the LLM's
    guided_decoding_backend, `special_ids` the tokenizer's ids of <TOOLCALL>, </TOOLCALL>, </think>.
    Refused with UnsupportedOnTrtllm ("[unsupported_parameter] ..."): what `_guided` cannot express."""
    layout = choice_layout(opts)
    temperature = float(opts.get("temperature", 0.0) or 0.0)
    out: dict[str, Any] = {"max_tokens": int(opts["max_new_tokens"])}
    if _is_greedy_temperature(temperature):
        out["top_k"] = 1
    else:
        out["temperature"] = temperature
        top_p = float(opts.get("top_p", 1.0))
        top_k = int(opts.get("top_k", 0) or 0)
        if top_p < 1.0:
            out["top_p"] = top_p
        if top_k > 0:
            out["top_k"] = top_k
    if layout.upstream_n > 1:
        out["n"] = layout.upstream_n
    if layout.ranked:
        out["best_of"] = layout.upstream_best_of
    if opts.get("logprobs") is not None:
        out["logprobs"] = _upstream_topk(opts["logprobs"])
    elif layout.ranked:  # ranking needs cumulative_logprob, which upstream computes only with logprobs on
        out["logprobs"] = _upstream_topk(0)
    if opts.get("prompt_logprobs") is not None:
        out["prompt_logprobs"] = _upstream_topk(opts["prompt_logprobs"])
    seed = opts.get("seed")
    if seed is not None:
        out["seed"] = int(seed) % SEED_MODULUS  # a negative int64 seed is a valid OpenAI seed
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
        out["guided_decoding"] = _guided(opts["guided"], guided_params, grammar_backend, special_ids)
    return out


def _lp(value: Any) -> float:
    v = float(value)
    return v if v >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _entry(token_id: int, position: Any, k: int) -> list:
    """One upstream logprobs position → our [logprob of token_id, [[id, logprob], ...k best]]."""
    if not isinstance(position, dict):  # List[float] form: the chosen token's logprob only
        return [_lp(position), []]
    chosen = position.get(int(token_id))
    # rank 1 = best; upstream appends the chosen token after the top-K when it is not among them
    ranked = sorted(position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                      -float(kv[1].logprob)))
    return [_lp(chosen.logprob) if chosen is not None else LOGPROB_FLOOR,
            [[int(t), _lp(p.logprob)] for t, p in ranked[:k]]]


def token_logprobs(token_ids: list[int], positions: Any, k: int) -> list[list]:
    """CompletionOutput.logprobs (TokenLogprobs = list[dict[int, Logprob]], or list[float]) for `token_ids`
    → the engine format [[logprob, [[id, logprob], ...]], ...] (docs/interfaces.md), k alternatives each."""
    return [_entry(t, p, k) for t, p in zip(token_ids, positions or [], strict=False)]


def prompt_logprobs(prompt_ids: list[int], positions: Any, k: int) -> list:
    """CompletionOutput.prompt_logprobs → the engine's per-prompt-token list (first entry None: nothing
    predicts the first token). Upstream at a678b91a computes them from the context logits, one position
    per prompt token where position t predicts token t + 1 (the last one predicts the first output
    token); a list one shorter is taken as already aligned to tokens 1.. ."""
    positions = list(positions or [])
    if len(positions) >= len(prompt_ids):
        positions = positions[:max(0, len(prompt_ids) - 1)]
    return [None] + [_entry(t, p, k) for t, p in zip(prompt_ids[1:], positions, strict=False)]


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
