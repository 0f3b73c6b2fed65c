"""Turning a stream of generated token ids into a stream of text: incremental detokenization that only
emits complete UTF-8 characters, stop strings (the stop text is never returned; text that could be the
start of a stop string is held back until it is decided), finish reasons and token counts.

And the other direction of a stream, in the `llm` model: `ResponsePump` sends a request's token messages
from background threads, merging those that queued up while a send was in flight (`merge_messages`).

Pure Python; used by the `nemovl` and `llm` Triton models and testable without a server.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decode a growing list of token ids into text deltas.

    `decode(ids) -> str` is the tokenizer's decode. The detokenizer re-decodes only a short window
    (the ids since the last emitted boundary plus a few before it, so merges with the previous token are
    seen) and emits the suffix that became final. A window whose text ends in U+FFFD (an incomplete
    multi-byte character from byte-fallback tokens) is held back until the character completes.
    """

    def __init__(self, decode: Callable[[list[int]], str], context_tokens: int = 4) -> None:
        self._decode = decode
        self._context = context_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # ids before this are already emitted

    def push(self, new_ids: Sequence[int]) -> str:
        """Add ids; return the text that is now complete (may be "")."""
        self.ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        if not full_text.startswith(prefix_text):
            # A re-tokenization boundary changed earlier characters; emit only what is new.
            return ""
        delta = full_text[len(prefix_text):]
        self._read_offset = len(self.ids)
        self._prefix_offset = max(0, self._read_offset - self._context)
        return delta

    def flush(self) -> str:
        """Emit whatever is still pending at the end of the stream (possibly with U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset:])
        self._read_offset = len(self.ids)
        self._prefix_offset = self._read_offset
        if full_text.startswith(prefix_text) and len(full_text) > len(prefix_text):
            return full_text[len(prefix_text):]
        return ""


class StopStringMatcher:
    """Cut the text stream at the first occurrence of any stop string.

    `push(text)` returns `(emit, stopped)`: the text that is safe to return and whether a stop string was
    found (the stop string and anything after it are dropped). A suffix that is a prefix of a stop string
    is held back until later text decides it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        first = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first < 0 or i < first):
                first = i
        if first >= 0:
            self.stopped = True
            self._held = ""
            return buf[:first], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (no stop string followed it)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out


@dataclass
class StreamDelta:
    """One step of the output stream (what one `nemovl` response carries)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "" while streaming; "stop" | "length" | "cancelled"
    completion_tokens: int


@dataclass
class TextStream:
    """Per-request streaming state: detokenizer + stop strings + token accounting.

    Tokens in `eos_ids` end the stream with "stop" and are counted but produce no text.
    """

    decode: Callable[[list[int]], str]
    stops: Sequence[str] = ()
    eos_ids: Sequence[int] = ()
    completion_tokens: int = 0
    finished: str = ""
    _detok: IncrementalDetokenizer = field(init=False)
    _stop: StopStringMatcher = field(init=False)

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.decode)
        self._stop = StopStringMatcher(self.stops)

    def push(self, token_ids: Sequence[int], engine_finish: str = "") -> StreamDelta:
        """Consume token ids from the engine (and the engine's finish reason, if it finished)."""
        ids = [int(t) for t in token_ids]
        self.completion_tokens += len(ids)
        text_ids = [t for t in ids if t not in self.eos_ids]
        hit_eos = len(text_ids) != len(ids)
        text = self._detok.push(text_ids) if text_ids else ""
        emit, stopped = self._stop.push(text)
        finish = ""
        if stopped:
            finish = "stop"
        elif hit_eos or engine_finish:
            tail, _ = self._stop.push(self._detok.flush())
            emit += tail
            if self._stop.stopped:
                finish = "stop"
            else:
                emit += self._stop.flush()
                finish = "stop" if hit_eos else engine_finish
        self.finished = finish
        return StreamDelta(text=emit, token_ids=ids, finish_reason=finish,
                           completion_tokens=self.completion_tokens)


# ------------------------------------------------------------------------------------- the llm's responses
@dataclass
class StreamMessage:
    """One `Sink.send` of a request (runtime/engine_api.py): new ids of choice `index`, its finish reason
    ("" while running), the logprobs payload ({"tokens": [...] aligned with token_ids, "prompt": [...]?})
    and whether it is the request's last message."""

    token_ids: list[int]
    finish_reason: str = ""
    index: int = 0
    logprobs: dict | None = None
    done: bool = False


def merge_messages(messages: Sequence[StreamMessage]) -> list[StreamMessage]:
    """Messages of one request, in order → as few as possible: a message joins the previous one when both
    are for the same choice and the previous one has not finished it (ids and logprob entries concatenate;
    the later finish reason and `done` win). Nothing is reordered or lost."""
    out: list[StreamMessage] = []
    for m in messages:
        prev = out[-1] if out else None
        if prev is None or prev.index != m.index or prev.finish_reason or prev.done:
            out.append(StreamMessage(list(m.token_ids), m.finish_reason, m.index,
                                     _copy_logprobs(m.logprobs), m.done))
            continue
        prev.token_ids.extend(m.token_ids)
        prev.finish_reason, prev.done = m.finish_reason, m.done
        if m.logprobs:
            if prev.logprobs is None:
                prev.logprobs = {"tokens": []}
            prev.logprobs["tokens"].extend(m.logprobs.get("tokens") or [])
            if m.logprobs.get("prompt") is not None:
                prev.logprobs["prompt"] = m.logprobs["prompt"]
    return out


def _copy_logprobs(lps: dict | None) -> dict | None:
    if not lps:
        return None
    out = {"tokens": list(lps.get("tokens") or [])}
    if lps.get("prompt") is not None:
        out["prompt"] = lps["prompt"]
    return out


class ResponsePump:
    """Sends streamed messages from `threads` background threads instead of the thread producing them.

    Why (issue 17, profile in docs/triton.md): in the `llm` model every response is a blocking IPC round trip
    from the stub to tritonserver; sent from the batcher thread, 8 of them per decode step took ~85 % of
    that thread's time at concurrency 8, so the engine stepped with the batch waiting on sends. Here the
    batcher only appends to a queue; a request's messages that queued up while the pump was busy go out as
    one (`merge_messages`), so a slow send means fewer, larger responses instead of a slower decode loop.

    `interval_s` > 0 makes each thread send at most one round of responses per interval: the messages of
    an interval merge, so a stream of many short steps costs fewer responses (and fewer hops downstream)
    at the price of up to `interval_s` more latency per response; the first response of a round is not
    delayed when the thread was idle.

    `send(key, message)` does the sending; `key` names the request (each key always goes to the same
    thread, so its messages stay in order). When `send` raises, the key's later messages are dropped and
    `on_error(key, exc)` is called once.
    """

    def __init__(self, send: Callable[[Hashable, StreamMessage], None], threads: int = 1,
                 on_error: Callable[[Hashable, Exception], None] | None = None, name: str = "pump",
                 interval_s: float = 0.0) -> None:
        if threads < 1:
            raise ValueError(f"a ResponsePump needs at least 1 thread, got {threads}.")
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}.")
        self._send = send
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._on_error = on_error
        self._queues: list[deque[tuple[Hashable, StreamMessage]]] = [deque() for _ in range(threads)]
        self._conds = [threading.Condition() for _ in range(threads)]
        self._failed: set[Hashable] = set()
        self._stop = False
        self._sent = [0] * threads  # responses sent (after merging), per thread
        self.messages = 0  # messages put
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def sent(self) -> int:
        """Responses sent so far (after merging; ≤ the messages put)."""
        return sum(self._sent)

    def put(self, key: Hashable, message: StreamMessage) -> None:
        """Queue `message` for request `key` (any thread; never blocks on a send)."""
        i = hash(key) % len(self._queues)
        with self._conds[i]:
            self._queues[i].append((key, message))
            self.messages += 1
            self._conds[i].notify()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then stop the threads."""
        self._stop = True
        self._wake.set()
        for c in self._conds:
            with c:
                c.notify_all()
        for t in self._threads:
            t.join(timeout=timeout_s)

    def _loop(self, i: int) -> None:
        q, cond = self._queues[i], self._conds[i]
        while True:
            with cond:
                while not q and not self._stop:
                    cond.wait()
                if not q and self._stop:
                    return
                batch = list(q)
                q.clear()
            started = time.monotonic()
            by_key: dict[Hashable, list[StreamMessage]] = {}
            for key, msg in batch:
                by_key.setdefault(key, []).append(msg)
            for key, msgs in by_key.items():
                for msg in merge_messages(msgs):
                    if key in self._failed:
                        break
                    try:
                        self._send(key, msg)
                        self._sent[i] += 1
                    except Exception as e:  # noqa: BLE001 - the requester is gone: drop its stream
                        self._failed.add(key)
                        if self._on_error is not None:
                            self._on_error(key, e)
                if msgs[-1].done:
                    self._failed.discard(key)  # nothing more comes for this key
            if self.interval_s and not self._stop:  # let the next messages gather (see the class docstring)
                self._wake.wait(max(0.0, started + self.interval_s - time.monotonic()))
