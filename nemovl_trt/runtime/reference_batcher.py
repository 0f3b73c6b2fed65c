"""cpu target: continuous batching over the PyTorch reference engine (`nemovl_trt.model.engine`).

`ContinuousBatcher` owns a `ReferenceEngine` in a background thread: requests submitted while a batch is
decoding join it at the next step; finished, cancelled or abandoned requests leave it. A sink reporting
`is_cancelled()` (the client went away) is cancelled in the engine. Control operations (cancel by id,
stats) are thread-safe.

Streaming interval (upstream TensorRT-LLM's and SGLang's `stream_interval`): while the running batch holds at
least `stream_interval_min_batch` sequences, a choice's tokens go to its sink every `stream_interval` tokens
(its first token and its last message at once). Each `Sink.send` of the Triton `llm` model is a blocking IPC
round trip, and with one per sequence per step they took most of the batcher's time at concurrency 8
(docs/triton.md); with a single sequence nobody else waits for it, so every token goes out.

Errors: a choice the engine ends with "error:<message>" (its prefill or its sampling raised) ends its whole
request with one `error:<message>` message to the sink (the request's other choices are cancelled in the
engine); the other requests keep decoding. Anything else that raises in the loop fails the requests it
concerns and the loop goes on: the batcher thread never dies while the model is loaded.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemovl_trt.runtime.engine_api import ERROR_PREFIX, STREAM_INTERVAL, STREAM_INTERVAL_MIN_BATCH, GenRequest

CANCELLED_IDS_KEPT = 100  # recent cancelled request ids reported by the stats control op


@dataclass
class BatcherStats:
    """Counters of a ContinuousBatcher (reported by the `llm` model's `stats` control op)."""

    active: list[str] = field(default_factory=list)
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    max_batch_seen: int = 0
    step_sequences: int = 0  # sum over steps of the sequences (choices) decoded: mean batch = this / steps
    step_s: float = 0.0  # seconds inside engine.step()
    messages: int = 0  # Sink.send calls with tokens (mean tokens per message = generated tokens / this)
    idle_s: float = 0.0  # seconds with nothing queued or running (waiting for requests)
    cancelled_ids: deque[str] = field(default_factory=lambda: deque(maxlen=CANCELLED_IDS_KEPT))


class ContinuousBatcher:
    """Continuous batching over a `nemovl_trt.model.engine.ReferenceEngine`.

    `make_sampling(dict) -> SamplingParams` converts the request's options. `max_batch_size` bounds the
    running batch; further requests wait in the queue. `to_tensor` turns the numpy embeddings into what
    the engine takes.
    """

    def __init__(self, engine: Any, make_sampling: Callable[[dict[str, Any]], Any], max_batch_size: int,
                 to_tensor: Callable[[np.ndarray | None], Any], cancel_poll_s: float = 0.02,
                 stream_interval: int = STREAM_INTERVAL,
                 stream_interval_min_batch: int = STREAM_INTERVAL_MIN_BATCH) -> None:
        if stream_interval < 1 or stream_interval_min_batch < 1:
            raise ValueError(f"stream_interval ({stream_interval}) and stream_interval_min_batch "
                             f"({stream_interval_min_batch}) must be at least 1.")
        self.engine = engine
        self.make_sampling = make_sampling
        self.max_batch_size = max_batch_size
        self.to_tensor = to_tensor
        self._pending: deque[GenRequest] = deque()
        self._cancel_ids: set[str] = set()
        self._cancel_choices: set[tuple[str, int]] = set()
        self._active: dict[str, GenRequest] = {}
        self._open: dict[str, set[int]] = {}  # choices of an active request that have not finished
        self._cond = threading.Condition()
        self._stop = False
        self.stats = BatcherStats()
        self.cancel_poll_s = cancel_poll_s  # how often requesters are asked whether they went away
        self.stream_interval = stream_interval
        self.stream_interval_min_batch = stream_interval_min_batch
        self._unsent: dict[str, dict[int, _Unsent]] = {}  # per running request and choice: what is not sent yet
        self._thread = threading.Thread(target=self._run, name="llm-batcher", daemon=True)
        self._thread.start()
        self._last_cancel_poll = 0.0

    # ---- API (any thread) ----
    def submit(self, req: GenRequest) -> None:
        with self._cond:
            self._pending.append(req)
            self.stats.submitted += 1
            self._cond.notify()

    def cancel(self, request_id: str, index: int | None = None) -> bool:
        """Cancel a queued or running request (or only its choice `index`); returns whether it was known."""
        with self._cond:
            known = request_id in self._active or any(r.request_id == request_id for r in self._pending)
            if known:
                if index is None:
                    self._cancel_ids.add(request_id)
                else:
                    self._cancel_choices.add((request_id, int(index)))
                self._cond.notify()
            return known

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            s = self.stats
            return {"active": sorted(self._active), "queued": [r.request_id for r in self._pending],
                    "submitted": s.submitted, "completed": s.completed, "cancelled": s.cancelled,
                    "failed": s.failed, "steps": s.steps, "max_batch_seen": s.max_batch_seen,
                    "step_sequences": s.step_sequences, "step_s": round(s.step_s, 6), "messages": s.messages,
                    "idle_s": round(s.idle_s, 6),
                    "cancelled_ids": list(s.cancelled_ids)}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- loop ----
    def _finish(self, req: GenRequest, reason: str) -> None:
        """End a whole request with one final message (cancelled: queued, by id, or requester gone)."""
        self._drop(req.request_id)
        self._count(req, reason)
        try:
            req.sink.send([], reason, done=True)
        except Exception:  # noqa: BLE001 - the requester is gone; nothing else to do
            pass

    def _drop(self, rid: str) -> None:
        """Forget a request that left the batch (with the tokens it had not been sent)."""
        self._active.pop(rid, None)
        self._open.pop(rid, None)
        self._unsent.pop(rid, None)

    def _count(self, req: GenRequest, reason: str) -> None:
        if reason == "cancelled":
            self.stats.cancelled += 1
            self.stats.cancelled_ids.append(req.request_id)
        else:
            self.stats.completed += 1

    def _slots(self) -> int:
        return sum(_choices(r) for r in self._active.values())

    def _admit(self) -> None:
        """Move queued requests into the engine (up to the batch limit) and apply cancels."""
        with self._cond:
            cancels, self._cancel_ids = self._cancel_ids, set()
            choice_cancels, self._cancel_choices = self._cancel_choices, set()
            for rid in cancels:
                queued = [r for r in self._pending if r.request_id == rid]
                for r in queued:
                    self._pending.remove(r)
                    self._finish(r, "cancelled")
            admit = []
            slots = self._slots()
            while self._pending and (not admit and not self._active
                                     or slots + _choices(self._pending[0]) <= self.max_batch_size):
                slots += _choices(self._pending[0])
                admit.append(self._pending.popleft())
        for rid, index in choice_cancels:
            if rid in self._active:
                self.engine.cancel(rid, index)
        for rid in cancels:
            req = self._active.get(rid)
            if req is not None:
                self.engine.cancel(rid)
                self._finish(req, "cancelled")
        for req in admit:
            try:
                n = _choices(req)
                if n > self.max_batch_size:
                    raise ValueError(f"[invalid_parameter] n = {n} is more than this engine's batch of "
                                     f"{self.max_batch_size} sequences.")
                self.engine.add(req.request_id, req.input_ids, self.to_tensor(req.mm_embeddings),
                                self.make_sampling(req.sampling))
            except Exception as e:  # noqa: BLE001 - reported to that request only
                self._fail(req, e)
                continue
            self._active[req.request_id] = req
            self._open[req.request_id] = set(range(n))
        self._poll_cancelled()

    def _poll_cancelled(self) -> None:
        """Every `cancel_poll_s` at most, ask the running requests' sinks whether their requester went away
        and cancel those that did (between steps, on the batcher thread: each `is_cancelled()` of a Triton
        request is an IPC round trip, hence the throttle; it stays on this thread so that it never overlaps
        the thread's own sends on the same request)."""
        now = time.monotonic()
        if now - self._last_cancel_poll < self.cancel_poll_s:
            return
        self._last_cancel_poll = now
        for rid, req in list(self._active.items()):
            try:
                gone = req.sink.is_cancelled()
            except Exception:  # noqa: BLE001 - a sink that cannot answer counts as gone
                gone = True
            if gone:
                self.engine.cancel(rid)
                self._finish(req, "cancelled")

    def _fail(self, req, error: Exception) -> None:
        """Report `error` to that request alone (its caller may already be gone)."""
        self.stats.failed += 1
        try:
            req.sink.send([], f"{ERROR_PREFIX}{error}", done=True)
        except Exception:  # noqa: BLE001
            pass

    def _run(self) -> None:
        while True:
            with self._cond:
                t0 = time.perf_counter()
                while not self._stop and not self._pending and not self._cancel_ids and not self._active:
                    self._cond.wait(timeout=1.0)
                self.stats.idle_s += time.perf_counter() - t0
                if self._stop:
                    return
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 - fail the running requests, keep the thread serving
                self._fail_active(e)

    def _iteration(self) -> None:
        """Admit, run one engine step, deliver its events."""
        self._admit()
        if not self._active or not self.engine.has_work():
            return
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._active))
        t0 = time.perf_counter()
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the engine isolates per-request failures; this is the rest
            self._fail_active(e)
            return
        finally:
            self.stats.step_s += time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.step_sequences += self._slots()
        self._deliver(outs)

    def _fail_active(self, error: Exception) -> None:
        """End every running request with `error` (a failure that cannot be pinned on one request)."""
        for rid, req in list(self._active.items()):
            self.engine.cancel(rid)
            self._drop(rid)
            self._fail(req, error)

    def _interval(self) -> int:
        """Tokens per message for this step's batch (1: every token goes out)."""
        return self.stream_interval if self._slots() >= self.stream_interval_min_batch else 1

    def _deliver(self, outs: list[Any]) -> None:
        """Engine events → at most one message per (request, choice) of this step; the request's last one is
        final. A choice's tokens wait in `_unsent` until `_interval()` of them are there (the first token and
        the finishing message go at once)."""
        interval = self._interval()
        touched: dict[tuple[str, int], None] = {}  # choices with events this step, in event order
        for out in outs:
            rid = out.request_id
            if rid not in self._active:
                continue
            ent = self._unsent.setdefault(rid, {}).setdefault(out.index, _Unsent())
            touched[(rid, out.index)] = None
            if out.token_id is not None and out.token_id >= 0:
                ent.ids.append(int(out.token_id))
                if out.logprob is not None:
                    ent.lps.append([out.logprob, [list(t) for t in out.top_logprobs]])
            if out.prompt_logprobs is not None:
                ent.prompt = [None if p is None else [p[0], [list(t) for t in p[1]]] for p in out.prompt_logprobs]
            if out.finished and not ent.reason.startswith(ERROR_PREFIX):
                ent.reason = out.finish_reason or "stop"
        for rid, index in touched:
            req = self._active.get(rid)
            ent = self._unsent.get(rid, {}).get(index)
            if req is None or ent is None:
                continue  # the request already ended in this loop (another choice failed)
            if ent.reason.startswith(ERROR_PREFIX):  # one failed choice ends the request, with the error
                self.engine.cancel(rid)
                self._drop(rid)
                self._fail(req, RuntimeError(ent.reason[len(ERROR_PREFIX):]))
                continue
            if not (ent.reason or not ent.sent or len(ent.ids) >= interval):
                continue  # wait for more tokens
            open_ = self._open.setdefault(rid, set())
            if ent.reason:
                open_.discard(index)
            done = not open_
            payload = None
            if ent.lps or ent.prompt is not None:
                payload = {"tokens": ent.lps}
                if ent.prompt is not None:
                    payload["prompt"] = ent.prompt
            ids, reason = ent.ids, ent.reason
            ent.ids, ent.lps, ent.prompt, ent.sent = [], [], None, True
            self.stats.messages += 1
            try:
                req.sink.send(ids, reason, index=index, logprobs=payload, done=done)
            except Exception:  # noqa: BLE001 - requester gone: leave the batch
                self.engine.cancel(rid)
                self._finish(req, "cancelled")
                continue
            if done:
                self._drop(rid)
                self._count(req, reason)


@dataclass
class _Unsent:
    """A running choice's tokens (and logprob entries) since its last message."""

    ids: list[int] = field(default_factory=list)
    lps: list[list] = field(default_factory=list)
    prompt: list | None = None
    reason: str = ""
    sent: bool = False  # its first message went out


def _choices(req: GenRequest) -> int:
    try:
        return max(1, int(req.sampling.get("n") or 1))
    except (TypeError, ValueError):
        return 1


def build_reference_batcher(checkpoint_dir: Path, max_batch_size: int, dtype: str | None = None,
                            stream_interval: int = STREAM_INTERVAL,
                            stream_interval_min_batch: int = STREAM_INTERVAL_MIN_BATCH) -> ContinuousBatcher:
    """Load the cpu-target LLM (the checkpoint the build put in the engines dir's `llm/`) into a
    ReferenceEngine behind a ContinuousBatcher; `dtype` overrides the checkpoint's ("float32", ...);
    `stream_interval*`: see ContinuousBatcher.
    Structured-output specs are compiled for the checkpoint's tokenizer (`model.grammar`)."""
    import torch

    from nemovl_trt.checkpoint.loader import load_checkpoint
    from nemovl_trt.model.engine import ReferenceEngine, SamplingParams
    from nemovl_trt.model.grammar import GrammarCompiler
    from nemovl_trt.model.vlm import NemotronVLM

    ckpt = load_checkpoint(checkpoint_dir)
    model = NemotronVLM.from_checkpoint(ckpt, dtype=dtype)
    eos = tuple(ckpt.generation.eos_token_ids) or tuple(ckpt.tokenizer.eos_ids)
    engine = ReferenceEngine(model, eos, max_batch_size=max_batch_size)
    model_dtype = model.language_model.dtype
    grammars = GrammarCompiler.for_tokenizer(ckpt.tokenizer, model.cfg.llm.vocab_size, list(eos))

    def make_sampling(opts: dict[str, Any]) -> Any:
        return sampling_params_from(SamplingParams, opts, grammars)

    def to_tensor(arr: np.ndarray | None) -> Any:
        if arr is None or arr.size == 0:
            return None
        return torch.from_numpy(np.ascontiguousarray(arr)).to(model_dtype)

    batcher = ContinuousBatcher(engine, make_sampling, max_batch_size, to_tensor, stream_interval=stream_interval,
                                stream_interval_min_batch=stream_interval_min_batch)
    batcher.grammars = grammars
    return batcher


def sampling_params_from(cls: Any, opts: dict[str, Any], grammars: Any = None) -> Any:
    """Build the engine's SamplingParams from the request options (field names of docs/interfaces.md).
    The model's eos ids are handled by the engine (unless `ignore_eos`). `guided` (a `model.grammar` spec)
    is compiled with `grammars`; a spec it cannot compile is a ValueError "[invalid_json_schema] ..."."""
    seed = opts.get("seed")
    grammar = None
    spec = opts.get("guided")
    if spec:
        if grammars is None:
            raise ValueError("[unsupported_parameter] this engine has no grammar compiler for structured output.")
        from nemovl_trt.model.grammar import GrammarError

        try:
            grammar = grammars.compile(spec)
        except GrammarError as e:
            raise ValueError(f"[invalid_json_schema] {e.message}") from None

    def opt_int(key: str) -> int | None:
        v = opts.get(key)
        return None if v is None else int(v)

    bias = opts.get("logit_bias") or {}
    return cls(max_new_tokens=int(opts["max_new_tokens"]), temperature=float(opts.get("temperature", 0.0)),
               top_p=float(opts.get("top_p", 1.0)), top_k=int(opts.get("top_k", 0)),
               seed=int(seed) if seed is not None else None,
               stop_token_ids=tuple(int(t) for t in (opts.get("stop_token_ids") or ())),
               ignore_eos=bool(opts.get("ignore_eos", False)), n=int(opts.get("n") or 1),
               frequency_penalty=float(opts.get("frequency_penalty") or 0.0),
               presence_penalty=float(opts.get("presence_penalty") or 0.0),
               repetition_penalty=float(opts.get("repetition_penalty") or 1.0),
               logit_bias=tuple(sorted((int(k), float(v)) for k, v in bias.items())),
               logprobs=opt_int("logprobs"), prompt_logprobs=opt_int("prompt_logprobs"), grammar=grammar)
