"""ReferenceEngine: continuous batching over the PyTorch reference model.

Each `step()`:
  1. applies cancellations (a cancelled choice reports one StepOutput with finish_reason "cancelled" and
     token_id None, and leaves the batch);
  2. prefills the requests added since the last step, one at a time (chunked SSD scan, full causal
     attention), forks the sequence state once per choice (`n`) and samples each choice's first token;
  3. runs ONE batched decode step for every choice that was already running: per-sequence Mamba states
     are stacked into [B, ...] tensors, attention KV caches of different lengths are padded and masked,
     and the MLP / projections run as one batch.

A request with n choices is prefilled once: the forked states share the prompt's tensors (the model
replaces a state's tensors when it advances, never writes into them), so a fork costs no copy.
Logit processing, logprobs and grammar masks: `model.sampling` and `model.grammar`.

Errors: an exception while prefilling a request, or while sampling one choice's token (e.g. a logits
processor raising), ends only that request's choice(s) with finish_reason "error:<message>"; a failing
batched decode forward ends the choices of that forward call the same way. Every other sequence goes on,
and `step()` itself does not raise for them.

Threading: `add` and `cancel` may be called from any thread (they only touch queues under a lock);
`step` must be called from one thread at a time (it takes the queued work under the same lock and
then computes without holding it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nemovl_trt.model.mamba2 import MambaState
from nemovl_trt.model.nemotron_h import KVCache, SequenceState
from nemovl_trt.model.sampling import (
    History,
    SamplingParams,
    choice_seed,
    draw,
    make_generator,
    process_logits,
    token_logprobs,
)
from nemovl_trt.model.vlm import NemotronVLM

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR_PREFIX = "error:"  # finish_reason of a choice that failed: "error:<message>" (engine_api.py)

TopLogprobs = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class StepOutput:
    """One event of a request's choice: a new token (token_id), and whether the choice has finished.
    finish_reason is None while running, then "stop", "length", "cancelled" (token_id None) or
    "error:<message>" (token_id None: this choice failed, see the module docstring).
    `index` is the choice; `logprob` / `top_logprobs` are set when the request asked for logprobs;
    `prompt_logprobs` (first event of choice 0 only, when asked) has one entry per prompt token, the first
    None (nothing precedes it)."""

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: str | None
    index: int = 0
    logprob: float | None = None
    top_logprobs: TopLogprobs = ()
    prompt_logprobs: tuple[tuple[float, TopLogprobs] | None, ...] | None = None


@dataclass
class _Request:
    request_id: str
    input_ids: list[int]
    mm_embeddings: torch.Tensor | None
    params: SamplingParams
    open_choices: int = 0
    skip: set[int] = field(default_factory=set)  # choices cancelled before the prefill


@dataclass
class _Choice:
    req: _Request
    index: int
    generator: torch.Generator
    state: SequenceState | None = None
    last_token: int = -1
    generated: list[int] = field(default_factory=list)
    history: History | None = None
    matcher: Any = None  # model.grammar.Matcher

    @property
    def key(self) -> tuple[str, int]:
        return self.req.request_id, self.index


def fork_state(state: SequenceState) -> SequenceState:
    """A second sequence continuing from `state`: new state objects over the same tensors (the model only
    ever replaces them when it advances, so the two sequences never see each other's tokens)."""
    return SequenceState(mamba={i: MambaState(conv=s.conv, ssm=s.ssm) for i, s in state.mamba.items()},
                         kv={i: KVCache(k=c.k, v=c.v) for i, c in state.kv.items()}, num_tokens=state.num_tokens)


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
        self.prefill_tokens = 0  # prompt tokens computed so far (n choices share one prefill)
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._cancel: set[tuple[str, int | None]] = set()
        self._running: dict[tuple[str, int], _Choice] = {}  # only touched by step()
        self._known: set[str] = set()  # ids pending or running (under the lock)

    # ----------------------------------------------------------------------------------- public API
    def add(self, request_id: str, input_ids: Sequence[int], mm_embeddings: torch.Tensor | None,
            params: SamplingParams) -> None:
        """Queue a request; it is prefilled at the next step. mm_embeddings [M,D] or [N,P,D] fill, in
        order, the prompt positions whose id is the config's img_context_token_id. Raises ValueError
        for a duplicate id, an empty or too long prompt, bad params or a placeholder/embedding mismatch."""
        vocab = self.model.cfg.llm.vocab_size
        params.validate(vocab)
        ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("the prompt has no tokens.")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model allows at most "
                             f"{self.max_seq_len - 1} before generating.")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab}).")
        n_slots = sum(1 for t in ids if t == self.model.cfg.img_context_token_id)
        n_rows = 0 if mm_embeddings is None else int(mm_embeddings.numel() // mm_embeddings.shape[-1])
        if n_slots != n_rows:
            raise ValueError(f"the prompt has {n_slots} image-context tokens but {n_rows} image embedding "
                             f"rows were given.")
        req = _Request(request_id, ids, mm_embeddings, params, open_choices=params.n)
        with self._lock:
            if request_id in self._known:
                raise ValueError(f"request id '{request_id}' is already in use.")
            self._known.add(request_id)
            self._pending.append(req)

    def cancel(self, request_id: str, index: int | None = None) -> None:
        """Ask for a request (or one of its choices) to stop; it reports "cancelled" at the next step
        (unknown or already finished ids are ignored)."""
        with self._lock:
            if request_id in self._known:
                self._cancel.add((request_id, index))

    def has_work(self) -> bool:
        """True while any request is queued, running or waiting to report its cancellation."""
        with self._lock:
            return bool(self._pending or self._running or self._cancel)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every choice by (at most) one token; returns the events of this step."""
        with self._lock:
            new, self._pending = self._pending, []
            cancels, self._cancel = self._cancel, set()
        out: list[StepOutput] = []
        for rid, index in cancels:
            out.extend(self._apply_cancel(rid, index, new))
        new = [r for r in new if r.open_choices > 0]
        decoding = list(self._running.values())
        for req in new:
            try:
                out.extend(self._prefill(req))
            except Exception as e:  # noqa: BLE001 - this request alone fails; the batch goes on
                out.extend(self._fail_request(req, e))
        size = self.max_batch_size or max(1, len(decoding))
        for start in range(0, len(decoding), size):
            part = decoding[start:start + size]
            try:
                out.extend(self._decode(part))
            except Exception as e:  # noqa: BLE001 - the batched forward failed: its choices end, others go on
                out.extend(self._fail_choice(c, e) for c in part if c.key in self._running)
        return out

    def _fail_request(self, req: _Request, error: Exception) -> list[StepOutput]:
        """End every choice of `req` that has not ended yet with "error:<message>" (prefill failures)."""
        out = [self._fail_choice(c, error) for k, c in list(self._running.items()) if k[0] == req.request_id]
        started = {o.index for o in out}
        for i in range(req.params.n):
            if i not in req.skip and i not in started and req.open_choices > 0:
                req.skip.add(i)
                out.append(self._close(req, i, FINISH_ERROR_PREFIX + _message(error)))
        return out

    def _fail_choice(self, c: _Choice, error: Exception) -> StepOutput:
        self._running.pop(c.key, None)
        c.state = None
        return self._close(c.req, c.index, FINISH_ERROR_PREFIX + _message(error))

    # ------------------------------------------------------------------------------------ internals
    def _apply_cancel(self, rid: str, index: int | None, new: list[_Request]) -> list[StepOutput]:
        out = []
        choices = [c for k, c in self._running.items() if k[0] == rid and (index is None or k[1] == index)]
        for c in choices:
            self._running.pop(c.key, None)
            out.append(self._close(c.req, c.index, FINISH_CANCELLED))
        for r in new:  # not prefilled yet: every choice (or the one asked) ends now
            if r.request_id == rid:
                for i in range(r.params.n) if index is None else [index]:
                    if 0 <= i < r.params.n and i not in r.skip:
                        r.skip.add(i)
                        out.append(self._close(r, i, FINISH_CANCELLED))
        return out

    def _close(self, req: _Request, index: int, reason: str, token: int | None = None, **lp: Any) -> StepOutput:
        req.open_choices -= 1
        if req.open_choices <= 0:
            with self._lock:
                self._known.discard(req.request_id)
        return StepOutput(req.request_id, token, True, reason, index=index, **lp)

    def _prefill(self, req: _Request) -> list[StepOutput]:
        lm = self.model.language_model
        emb = self.model.embed(req.input_ids, req.mm_embeddings)  # [L,D]
        req.mm_embeddings = None
        state = lm.new_state()
        size = self.prefill_chunk or emb.shape[0]
        want_prompt = req.params.prompt_logprobs is not None
        pieces = []
        for start in range(0, emb.shape[0], size):  # continued prefill from the state of the last piece
            logits = lm.forward_embeds(emb[None, start:start + size], [state], last_only=not want_prompt)
            pieces.append(logits[0])
        self.prefill_tokens += emb.shape[0]
        last = pieces[-1] if not want_prompt else pieces[-1][-1]
        prompt_lp = self._prompt_logprobs(req, torch.cat(pieces, dim=0)) if want_prompt else None
        indices = [i for i in range(req.params.n) if i not in req.skip]
        out = []
        for j, i in enumerate(indices):
            c = _Choice(req, i, make_generator(choice_seed(req.params.seed, i)),
                        state=state if j == 0 else fork_state(state))
            if req.params.needs_history:
                c.history = History(last.shape[-1], req.input_ids, device=last.device)
            if req.params.grammar is not None:
                c.matcher = req.params.grammar.matcher()
            self._running[c.key] = c
            try:
                out.append(self._accept(c, last, prompt_lp if j == 0 else None))
            except Exception as e:  # noqa: BLE001 - this choice alone fails
                out.append(self._fail_choice(c, e))
        return out

    def _prompt_logprobs(self, req: _Request, logits: torch.Tensor) -> tuple:
        """logits [L,V] of the prompt positions → per prompt token (logprob, top alternatives); position j
        predicts token j+1, so the first token has none. Raw distribution: bias only (no history yet)."""
        k = int(req.params.prompt_logprobs or 0)
        lp = torch.log_softmax(logits.float(), dim=-1)
        out: list[tuple[float, TopLogprobs] | None] = [None]
        for j, tok in enumerate(req.input_ids[1:]):
            row = lp[j]
            top: TopLogprobs = ()
            if k:
                vals, ids = torch.topk(row, min(k, row.shape[-1]))
                top = tuple((int(a), float(b)) for a, b in zip(ids.tolist(), vals.tolist(), strict=True))
            out.append((float(row[tok]), top))
        return tuple(out)

    def _decode(self, batch: list[_Choice]) -> list[StepOutput]:
        lm = self.model.language_model
        device = lm.lm_head.weight.device
        ids = torch.tensor([[c.last_token] for c in batch], dtype=torch.int64, device=device)  # [B,1]
        logits = lm.forward_embeds(lm.embed_tokens(ids), [c.state for c in batch], last_only=True)  # [B,V]
        out = []
        for i, c in enumerate(batch):
            try:
                out.append(self._accept(c, logits[i]))
            except Exception as e:  # noqa: BLE001 - this choice alone fails
                out.append(self._fail_choice(c, e))
        return out

    def _accept(self, c: _Choice, logits: torch.Tensor, prompt_lp: tuple | None = None) -> StepOutput:
        """Process logits [V], draw the choice's token, record it, decide whether the choice is finished."""
        p = c.req.params
        allowed = c.matcher.allowed().to(logits.device) if c.matcher is not None else None
        if allowed is not None and not bool(allowed.any()):  # the grammar has nothing left: end here
            self._running.pop(c.key, None)
            return self._close(c.req, c.index, FINISH_STOP, prompt_logprobs=prompt_lp)
        scaled = process_logits(logits, p, c.history, allowed)
        tok = draw(scaled, p, c.generator)
        lp: dict[str, Any] = {"prompt_logprobs": prompt_lp}
        if p.logprobs is not None:
            lp["logprob"], lp["top_logprobs"] = token_logprobs(scaled, tok, p.logprobs)
        c.generated.append(tok)
        c.last_token = tok
        if c.history is not None:
            c.history.add(tok)
        reason = None
        is_eos = tok in self.eos_ids
        if c.matcher is not None:
            if is_eos:
                reason = FINISH_STOP  # the grammar allowed the end (its output is complete)
            else:
                c.matcher.consume(tok)
                if c.matcher.done:
                    reason = FINISH_STOP
        if reason is None and (tok in p.stop_token_ids or (not p.ignore_eos and is_eos)):
            reason = FINISH_STOP
        elif reason is None and (len(c.generated) >= p.max_new_tokens
                                 or len(c.req.input_ids) + len(c.generated) >= self.max_seq_len):
            reason = FINISH_LENGTH
        if reason is None:
            return StepOutput(c.req.request_id, tok, False, None, index=c.index, **lp)
        self._running.pop(c.key, None)
        c.state = None
        return self._close(c.req, c.index, reason, tok, **lp)


def _message(error: Exception) -> str:
    """One line naming the failure (the exception's text, else its type)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def generate(model: NemotronVLM, input_ids: Sequence[int], mm_embeddings: torch.Tensor | None = None,
             params: SamplingParams | None = None, eos_ids: Sequence[int] = ()) -> list[int]:
    """Generate for one prompt with a private engine; returns the new token ids (stop token included) of
    choice 0. Raises RuntimeError when that choice fails."""
    engine = ReferenceEngine(model, eos_ids)
    engine.add("generate", input_ids, mm_embeddings, params or SamplingParams())
    tokens: list[int] = []
    while engine.has_work():
        for ev in engine.step():
            if ev.index == 0 and ev.finish_reason and ev.finish_reason.startswith(FINISH_ERROR_PREFIX):
                raise RuntimeError(f"generation failed: {ev.finish_reason[len(FINISH_ERROR_PREFIX):]}")
            if ev.token_id is not None and ev.index == 0:
                tokens.append(ev.token_id)
    return tokens
