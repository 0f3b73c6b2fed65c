"""ReferenceEngine: continuous batching over the PyTorch reference model.

Each `step()`:
  1. applies cancellations (a cancelled request reports one StepOutput with finish_reason "cancelled"
     and token_id None, and leaves the batch);
  2. prefills the requests added since the last step, one at a time (chunked SSD scan, full causal
     attention) and samples each one's first token;
  3. runs ONE batched decode step for every sequence that was already running: per-sequence Mamba
     states are stacked into [B, ...] tensors, attention KV caches of different lengths are padded
     and masked, and the MLP / projections run as one batch.

Threading: `add` and `cancel` may be called from any thread (they only touch queues under a lock);
`step` must be called from one thread at a time (it takes the queued work under the same lock and
then computes without holding it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nemovl_trt.model.nemotron_h import SequenceState
from nemovl_trt.model.sampling import SamplingParams, make_generator, sample_token
from nemovl_trt.model.vlm import NemotronVLM

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class StepOutput:
    """One event of a request: a new token (token_id), and whether the request has finished.
    finish_reason is None while running, then "stop", "length" or "cancelled" (token_id None)."""

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None


@dataclass
class _Request:
    request_id: str
    input_ids: list[int]
    mm_embeddings: torch.Tensor | None
    params: SamplingParams
    generator: torch.Generator
    state: SequenceState | None = None
    last_token: int = -1
    generated: list[int] = field(default_factory=list)


class ReferenceEngine:
    """Continuous-batching generator over a NemotronVLM.

    eos_ids: the checkpoint's end-of-sequence ids (generation_config); max_batch_size caps how many
    sequences one decode call stacks (more running sequences are decoded in several calls of the
    same step); max_seq_len defaults to the config's max_sequence_length; prefill_chunk, when set,
    prefills long prompts in pieces of at most that many tokens (same result, bounded memory).
    """

    def __init__(self, model: NemotronVLM, eos_ids: Sequence[int] = (), max_batch_size: int | None = None,
                 max_seq_len: int | None = None, prefill_chunk: int | None = None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}.")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.max_batch_size = max_batch_size
        self.max_seq_len = int(max_seq_len or model.cfg.max_sequence_length)
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._cancel: set[str] = set()
        self._running: dict[str, _Request] = {}  # only touched by step()
        self._known: set[str] = set()  # ids pending or running (under the lock)

    # ----------------------------------------------------------------------------------- public API
    def add(self, request_id: str, input_ids: Sequence[int], mm_embeddings: torch.Tensor | None,
            params: SamplingParams) -> None:
        """Queue a request; it is prefilled at the next step. mm_embeddings [M,D] or [N,P,D] fill, in
        order, the prompt positions whose id is the config's img_context_token_id. Raises ValueError
        for a duplicate id, an empty or too long prompt, bad params or a placeholder/embedding mismatch."""
        params.validate()
        ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("the prompt has no tokens.")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model allows at most "
                             f"{self.max_seq_len - 1} before generating.")
        vocab = self.model.cfg.llm.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab}).")
        n_slots = sum(1 for t in ids if t == self.model.cfg.img_context_token_id)
        n_rows = 0 if mm_embeddings is None else int(mm_embeddings.numel() // mm_embeddings.shape[-1])
        if n_slots != n_rows:
            raise ValueError(f"the prompt has {n_slots} image-context tokens but {n_rows} image embedding "
                             f"rows were given.")
        req = _Request(request_id, ids, mm_embeddings, params, make_generator(params.seed))
        with self._lock:
            if request_id in self._known:
                raise ValueError(f"request id '{request_id}' is already in use.")
            self._known.add(request_id)
            self._pending.append(req)

    def cancel(self, request_id: str) -> None:
        """Ask for a request to stop; it reports "cancelled" at the next step (unknown or already
        finished ids are ignored)."""
        with self._lock:
            if request_id in self._known:
                self._cancel.add(request_id)

    def has_work(self) -> bool:
        """True while any request is queued, running or waiting to report its cancellation."""
        with self._lock:
            return bool(self._pending or self._running or self._cancel)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every request by (at most) one token; returns the events of this step."""
        with self._lock:
            new, self._pending = self._pending, []
            cancels, self._cancel = self._cancel, set()
        out: list[StepOutput] = []
        for rid in cancels:
            gone = self._running.pop(rid, None)
            if gone is None:
                kept = [r for r in new if r.request_id != rid]
                if len(kept) == len(new):
                    continue
                new = kept
            out.append(StepOutput(rid, None, True, FINISH_CANCELLED))
            self._forget(rid)
        decoding = list(self._running.values())
        for req in new:
            out.append(self._prefill(req))
        size = self.max_batch_size or max(1, len(decoding))
        for start in range(0, len(decoding), size):
            out.extend(self._decode(decoding[start:start + size]))
        return out

    # ------------------------------------------------------------------------------------ internals
    def _forget(self, rid: str) -> None:
        with self._lock:
            self._known.discard(rid)

    def _prefill(self, req: _Request) -> StepOutput:
        lm = self.model.language_model
        emb = self.model.embed(req.input_ids, req.mm_embeddings)  # [L,D]
        req.mm_embeddings = None
        req.state = lm.new_state()
        size = self.prefill_chunk or emb.shape[0]
        for start in range(0, emb.shape[0], size):  # continued prefill from the state of the last piece
            logits = lm.forward_embeds(emb[None, start:start + size], [req.state], last_only=True)  # [1,V]
        self._running[req.request_id] = req
        return self._accept(req, logits[0])

    def _decode(self, batch: list[_Request]) -> list[StepOutput]:
        lm = self.model.language_model
        device = lm.lm_head.weight.device
        ids = torch.tensor([[r.last_token] for r in batch], dtype=torch.int64, device=device)  # [B,1]
        logits = lm.forward_embeds(lm.embed_tokens(ids), [r.state for r in batch], last_only=True)  # [B,V]
        return [self._accept(r, logits[i]) for i, r in enumerate(batch)]

    def _accept(self, req: _Request, logits: torch.Tensor) -> StepOutput:
        """Sample from logits [V], record the token, decide whether the request is finished."""
        tok = sample_token(logits, req.params, req.generator)
        req.generated.append(tok)
        req.last_token = tok
        reason = None
        if tok in req.params.stop_token_ids or (not req.params.ignore_eos and tok in self.eos_ids):
            reason = FINISH_STOP
        elif (len(req.generated) >= req.params.max_new_tokens
              or len(req.input_ids) + len(req.generated) >= self.max_seq_len):
            reason = FINISH_LENGTH
        if reason is not None:
            self._running.pop(req.request_id, None)
            req.state = None
            self._forget(req.request_id)
        return StepOutput(req.request_id, tok, reason is not None, reason)


def generate(model: NemotronVLM, input_ids: Sequence[int], mm_embeddings: torch.Tensor | None = None,
             params: SamplingParams | None = None, eos_ids: Sequence[int] = ()) -> list[int]:
    """Generate for one prompt with a private engine; returns the new token ids (stop token included)."""
    engine = ReferenceEngine(model, eos_ids)
    engine.add("generate", input_ids, mm_embeddings, params or SamplingParams())
    tokens: list[int] = []
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                tokens.append(ev.token_id)
    return tokens
