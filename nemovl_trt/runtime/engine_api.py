"""The one small interface both LLM engines offer the `llm` Triton model (and the tests).

A request carries its prompt ids, its vision embeddings (rows in prompt order, one per image-context
token) and its sampling options; the engine streams generated ids to the request's `Sink` and ends with a
non-empty finish reason: "stop", "length", "cancelled", or "error:<message>".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

ERROR_PREFIX = "error:"  # finish_reason of a request that failed after it was queued: "error:<message>"
# Where neither the build config nor the model config says: every token its own streamed response, and the
# running batch from which a larger stream interval would apply (docs/triton.md "Stream interval").
STREAM_INTERVAL = 1
STREAM_INTERVAL_MIN_BATCH = 2


class Sink(Protocol):
    """Where a request's outputs go."""

    def send(self, token_ids: list[int], finish_reason: str, index: int = 0, logprobs: dict | None = None,
             done: bool | None = None) -> None:
        """Stream new ids of choice `index`; a non-empty `finish_reason` ends that choice. `done` marks the
        request's last call (None: the same as a non-empty finish_reason, the n = 1 case). `logprobs`:
        {"tokens": [[logprob, [[id, logprob], ...]], ...] aligned with token_ids, "prompt": [...]?}."""

    def is_cancelled(self) -> bool:
        """True when the requester went away."""


@dataclass
class GenRequest:
    """One generation request.

    input_ids: prompt ids [L], image-context tokens already expanded (EVS applied for video).
    mm_embeddings: float [M, llm_hidden] with M = number of image-context ids in `input_ids`, or None.
    sampling: max_new_tokens (required), temperature, top_p, top_k, seed, stop_token_ids, ignore_eos, n,
    frequency_penalty, presence_penalty, repetition_penalty, logit_bias {id: bias}, logprobs,
    prompt_logprobs, guided (a `model.grammar` spec) (docs/interfaces.md)."""

    request_id: str
    input_ids: list[int]
    mm_embeddings: np.ndarray | None
    sampling: dict[str, Any]
    sink: Sink


class LlmEngine(Protocol):
    """What `triton/models/llm.py` calls. Every method is safe from any thread."""

    def submit(self, req: GenRequest) -> None:
        """Queue a request; results go to `req.sink`."""

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; True when it was known."""

    def snapshot(self) -> dict[str, Any]:
        """Active/queued request ids and counters (the `stats` control op)."""

    def close(self) -> None:
        """Stop the loop and release the engine."""
