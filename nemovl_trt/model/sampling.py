"""Sampling parameters and next-token selection, with one `torch.Generator` per choice so a request's
tokens never depend on what else is in the batch.

The order of the logit processing (the OpenAI / vLLM definitions):
  1. `logit_bias` is added to the raw logits;
  2. `repetition_penalty` p (vLLM / HF): for every token already in the prompt or the output, a positive
     logit is divided by p, a negative one multiplied by p;
  3. `frequency_penalty` f and `presence_penalty` r (OpenAI): logit -= f · count + r · (count > 0), where
     count is how often the token occurs in the output so far;
  4. the grammar mask (structured output): disallowed tokens get −inf;
  5. temperature T: logits / T (T below GREEDY_TEMPERATURE, T = 0 included, is greedy: argmax, and logprobs
     are taken at T = 1).
The log-softmax after step 5 is the distribution that `logprobs` reports; top-k / top-p then truncate it
for the draw (they do not change the reported logprobs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs cap)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI: each bias is in [-100, 100]
# Temperatures below this are greedy (argmax), never a division. Why: logits / T overflows fp32 to inf once
# |logit| / T > 3.4e38 (T = FLT_MIN = 1.18e-38 does it for any logit > 4), and softmax of several infs is NaN,
# which makes torch.multinomial raise mid-stream. At T = 1e-5 a logit gap of 1e-3 already weights the runner-up
# by e^-100, so the draw is the argmax in all but exact ties: treating it as greedy changes no real answer,
# while |logit| / 1e-5 stays far inside fp32 (logits would need to exceed 3e33).
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    max_new_tokens: tokens to generate at most per choice (finish_reason "length" when reached).
    temperature: below GREEDY_TEMPERATURE (0 included) → greedy (argmax); else sample from
    softmax(processed logits / temperature).
    top_p: nucleus mass in (0, 1]; 1 disables. top_k: keep the k best logits; 0 disables.
    seed: seeds choice 0's generator; choice i uses a seed derived from (seed, i) (None → OS entropy).
    stop_token_ids: extra ids that end a choice with "stop" (the token is emitted).
    ignore_eos: do not stop on the model's eos ids (stop_token_ids still apply).
    n: independent choices for the prompt (prefilled once, the state forked per choice).
    frequency_penalty, presence_penalty: OpenAI's, in [-2, 2]; repetition_penalty: vLLM's, > 0 (1 = off).
    logit_bias: ((token_id, bias), ...), each bias in [-100, 100].
    logprobs: None → off; k ≥ 0 → report the chosen token's logprob and the k best alternatives.
    prompt_logprobs: None → off; k ≥ 0 → report each prompt token's logprob (and k alternatives).
    grammar: a `model.grammar.GrammarHandle` that constrains the output, or None.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: Any = field(default=None, compare=False)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError (one sentence) for out-of-range values."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}.")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {v}.")
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}.")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}.")
        for tok, bias in self.logit_bias:
            if vocab_size is not None and not (0 <= tok < vocab_size):
                raise ValueError(f"logit_bias names token {tok}, outside the vocabulary [0, {vocab_size}).")
            if not (-LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {tok}.")

    @property
    def is_greedy(self) -> bool:
        """Whether the next token is the argmax (temperature below GREEDY_TEMPERATURE, see there)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_history(self) -> bool:
        """Whether the processing reads the tokens generated so far (penalties)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: `seed` itself for choice 0 (so n = 1 is unchanged), a derived one after."""
    if seed is None or index == 0:
        return seed
    return (int(seed) * 1_000_003 + 0x9E3779B97F4A7C15 * index) % (2 ** 63)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (or from OS entropy when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) % (2 ** 64))
    return g


class History:
    """What the penalties need of one choice: output token counts and prompt ∪ output presence."""

    def __init__(self, vocab: int, prompt_ids: list[int], device: torch.device | None = None) -> None:
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if prompt_ids:
            self.seen[torch.as_tensor(prompt_ids, dtype=torch.int64, device=device)] = True

    def add(self, token: int) -> None:
        self.counts[token] += 1.0
        self.seen[token] = True

    def copy(self) -> History:
        out = History.__new__(History)
        out.counts, out.seen = self.counts.clone(), self.seen.clone()
        return out


def process_logits(logits: torch.Tensor, params: SamplingParams, history: History | None = None,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1-5 of the module docstring: raw logits [V] → the scaled logits [V] (fp32) whose log-softmax
    is the reported distribution. `allowed` is the grammar's bool mask [V] (None: no grammar)."""
    x = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.int64, device=x.device)
        x.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32, device=x.device))
    if history is not None:
        if params.repetition_penalty != 1.0:
            p = params.repetition_penalty
            x = torch.where(history.seen, torch.where(x > 0, x / p, x * p), x)
        if params.frequency_penalty:
            x = x - params.frequency_penalty * history.counts
        if params.presence_penalty:
            x = x - params.presence_penalty * (history.counts > 0).float()
    if allowed is not None:
        x = x.masked_fill(~allowed, -math.inf)
    if not params.is_greedy:
        x = x / params.temperature
    return x


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] fp32 → temperature-scaled logits [V] with tokens outside top-k / top-p set to −inf.
    Top-k is applied first, then top-p keeps the smallest prefix of the sorted distribution whose mass
    reaches top_p (the best token is always kept)."""
    return truncate(logits.float() / temperature, top_k, top_p)


def truncate(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p on already scaled logits [V] (tokens dropped → −inf)."""
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, -math.inf)
    return x


def draw(scaled: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from processed logits [V] (`process_logits`): argmax when the params are greedy
    (temperature below GREEDY_TEMPERATURE; no random draw), else one multinomial draw after top-k / top-p with
    the choice's generator."""
    if params.is_greedy:
        return int(torch.argmax(scaled))
    probs = torch.softmax(truncate(scaled, params.top_k, params.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from raw logits [V] without history or grammar (bias still applies)."""
    return draw(process_logits(logits, params), params, generator)


def token_logprobs(scaled: torch.Tensor, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """(logprob of `token`, the k best (id, logprob) sorted best first) under log_softmax(scaled)."""
    lp = torch.log_softmax(scaled, dim=-1)
    chosen = float(lp[token])
    if k <= 0:
        return chosen, ()
    vals, ids = torch.topk(lp, min(k, lp.shape[-1]))
    return chosen, tuple((int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)
                         if math.isfinite(v))  # tokens a grammar forbids are not alternatives
