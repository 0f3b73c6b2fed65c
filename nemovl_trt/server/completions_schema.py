"""Validation of `/v1/completions` bodies (OpenAI legacy completions: a raw prompt, no chat template)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from nemovl_trt.server.errors import invalid, not_supported
from nemovl_trt.server.fields import boolean, is_int, request_model
from nemovl_trt.server.sampling_schema import Limits, Sampling, parse_sampling

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_PROMPTS = 16  # prompts per request (each is one engine request of n or best_of choices)
MAX_CHOICES = 64  # prompts x max(n, best_of): the candidates one request may ask the engine for
TOKEN_ID_MAX = 2 ** 31 - 1  # the engine's id tensors are int32/int64; the edge guard's bound for one prompt

Prompt = str | list[int]


@dataclass
class CompletionRequest:
    """A validated completion request; `prompts` are texts or token-id lists (choices are indexed
    prompt-major: prompt i's choice j is index i * n + j), `prompt` the first one, `params` the nemovl
    `params` JSON shared by all prompts."""

    model: str
    prompt: Prompt
    params: dict[str, Any]
    sampling: Sampling = field(default_factory=Sampling)
    echo: bool = False
    prompts: list[Prompt] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [self.prompt]

    @property
    def stream(self) -> bool:
        return self.sampling.stream

    @property
    def ranked(self) -> bool:
        """best_of > n: the engine's candidates are ranked by the frontend."""
        return self.sampling.best_of > self.sampling.n

    def for_prompt(self, i: int) -> CompletionRequest:
        """The request of prompt i alone (what one engine request is built from)."""
        return replace(self, prompt=self.prompts[i], prompts=[self.prompts[i]])


def _one_prompt(p: Any, param: str) -> Prompt:
    if isinstance(p, str):
        if not p:
            raise invalid(f"'{param}' must not be empty.", "prompt")
        return p
    if isinstance(p, list) and p and all(is_int(t) and 0 <= t <= TOKEN_ID_MAX for t in p):
        return list(p)
    raise invalid(f"'{param}' must be a non-empty string or a non-empty list of token ids (integers in "
                  f"[0, {TOKEN_ID_MAX}]).", "prompt")


def _prompts(body: dict[str, Any]) -> list[Prompt]:
    """OpenAI's `prompt`: a string, a list of token ids, or a list of either (several prompts)."""
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(is_int(t) for t in p)):
        return [_one_prompt(p, "prompt")]
    if isinstance(p, list) and p and all(isinstance(x, str | list) for x in p):
        if len(p) > MAX_PROMPTS:
            raise invalid(f"'prompt' holds {len(p)} prompts; at most {MAX_PROMPTS} are accepted per request.",
                          "prompt")
        return [_one_prompt(x, f"prompt[{i}]") for i, x in enumerate(p)]
    raise invalid("'prompt' must be a string, a list of token ids, or a list of strings or of token-id lists.",
                  "prompt")


def parse_completion_request(body: Any, limits: Limits) -> CompletionRequest:
    """Validate a decoded JSON body. Raises APIError(400) naming the bad field."""
    model = request_model(body)
    prompts = _prompts(body)
    if body.get("suffix"):
        raise not_supported("'suffix' (insertion) is not supported by this model.", "suffix")
    params: dict[str, Any] = {}
    sampling = parse_sampling(body, limits, params, chat=False)
    if len(prompts) * max(sampling.n, sampling.best_of) > MAX_CHOICES:
        raise invalid(f"{len(prompts)} prompts x {max(sampling.n, sampling.best_of)} choices is more than the "
                      f"{MAX_CHOICES} completions one request may ask for.", "prompt")
    params.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    echo = bool(boolean(body, "echo"))
    if echo and sampling.logprobs is not None:
        params["prompt_logprobs"] = sampling.logprobs
    elif echo and any(not isinstance(p, str) for p in prompts):
        params["prompt_logprobs"] = 0  # the prompt's token texts come with its logprobs: echo needs them
    return CompletionRequest(model=model, prompt=prompts[0], params=params, sampling=sampling, echo=echo,
                             prompts=prompts)
