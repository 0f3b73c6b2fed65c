"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p), with one
`torch.Generator` per request so a request's tokens never depend on what else is in the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    max_new_tokens: tokens to generate at most (finish_reason "length" when reached).
    temperature: 0 → greedy (argmax); > 0 → sample from softmax(logits / temperature).
    top_p: nucleus mass in (0, 1]; 1 disables. top_k: keep the k best logits; 0 disables.
    seed: seeds the request's own generator (None → a nondeterministic seed).
    stop_token_ids: extra ids that end the request with "stop" (the token is emitted).
    ignore_eos: do not stop on the model's eos ids (stop_token_ids still apply).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError (one sentence) for out-of-range values."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}.")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (or from OS entropy when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] fp32 → temperature-scaled logits [V] with tokens outside top-k / top-p set to −inf.
    Top-k is applied first, then top-p keeps the smallest prefix of the sorted distribution whose mass
    reaches top_p (the best token is always kept)."""
    x = logits.float() / temperature
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


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from logits [V]: argmax when temperature == 0 (no random draw), else one
    multinomial draw from the filtered distribution using the request's generator."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    x = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
