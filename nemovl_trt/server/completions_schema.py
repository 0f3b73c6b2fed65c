"""Validation of `/v1/completions` bodies (OpenAI legacy completions: a raw prompt, no chat template)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemovl_trt.server.errors import invalid, not_supported
from nemovl_trt.server.fields import boolean, is_int, request_model
from nemovl_trt.server.sampling_schema import Limits, Sampling, parse_sampling

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class CompletionRequest:
    """A validated completion request; `prompt` is text or token ids, `params` the nemovl `params` JSON."""

    model: str
    prompt: str | list[int]
    params: dict[str, Any]
    sampling: Sampling = field(default_factory=Sampling)
    echo: bool = False

    @property
    def stream(self) -> bool:
        return self.sampling.stream


def _prompt(body: dict[str, Any]) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], str) or isinstance(p[0], list)):
        p = p[0]  # a batch of one (LangChain's OpenAI LLM sends ["text"])
    if isinstance(p, str):
        if not p:
            raise invalid("'prompt' must not be empty.", "prompt")
        return p
    if isinstance(p, list) and p and all(is_int(t) and t >= 0 for t in p):
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, str | list) for x in p):
        raise not_supported("One prompt per request: send several requests (or use 'n' for several choices).",
                            "prompt")
    raise invalid("'prompt' must be a string, a list of token ids, or a list holding one of them.", "prompt")


def parse_completion_request(body: Any, limits: Limits) -> CompletionRequest:
    """Validate a decoded JSON body. Raises APIError(400) naming the bad field."""
    model = request_model(body)
    prompt = _prompt(body)
    if body.get("suffix"):
        raise not_supported("'suffix' (insertion) is not supported by this model.", "suffix")
    params: dict[str, Any] = {}
    sampling = parse_sampling(body, limits, params, chat=False)
    params.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    echo = bool(boolean(body, "echo"))
    if echo and sampling.logprobs is not None:
        params["prompt_logprobs"] = sampling.logprobs
    elif echo and not isinstance(prompt, str):
        params["prompt_logprobs"] = 0  # the prompt's token texts come with its logprobs: echo needs them
    return CompletionRequest(model=model, prompt=prompt, params=params, sampling=sampling, echo=echo)
