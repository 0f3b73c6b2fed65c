"""Turning a stream of generated token ids into a stream of text: incremental detokenization that only
emits complete UTF-8 characters, stop strings (the stop text is never returned; text that could be the
start of a stop string is held back until it is decided), finish reasons and token counts.

Pure Python; used by the `nemovl` and `llm` Triton models and testable without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        """Consume token ids from the engine (and the engine's finish reason, if it finished).

        Several ids at once (the llm's stream interval) give the same text, token ids and token count as
        one id per call: with stop strings they are taken one at a time, and the ids after the one that
        completed a stop string are dropped (not counted, not returned)."""
        ids = [int(t) for t in token_ids]
        if len(ids) < 2 or not self.stops:
            return self._push(ids, engine_finish)
        text: list[str] = []
        for i, tid in enumerate(ids):
            delta = self._push([tid], engine_finish if i == len(ids) - 1 else "")
            text.append(delta.text)
            if delta.finish_reason:
                return StreamDelta("".join(text), ids[:i + 1], delta.finish_reason, self.completion_tokens)
        return StreamDelta("".join(text), ids, "", self.completion_tokens)

    def _push(self, ids: list[int], engine_finish: str) -> StreamDelta:
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
