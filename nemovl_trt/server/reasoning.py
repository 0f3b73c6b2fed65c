"""Split the model's output into `reasoning_content` (inside `<think>…</think>`) and `content`.

One incremental splitter serves streaming and non-streaming alike, so both give the same split for
the same text however it is chunked. Rules:
- reasoning on (the request asked for `/think`): the output is reasoning until `</think>` (a leading
  `<think>` is dropped — the prompt may or may not end with it); an output that never closes the tag
  (typically cut by max_tokens) stays reasoning.
- reasoning off: text is content; if the model still opens `<think>` at the very start, that block is
  held until `</think>` and returned as reasoning; if it is never closed it is returned as content, so an
  unclosed tag never swallows the answer.
Tool calls are removed before this stage (tools.py), so an unclosed `<think>` cannot hide one either.
"""

from __future__ import annotations

from nemovl_trt.server.textscan import safe_prefix_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningSplitter:
    """Incremental `<think>` splitter. `feed(text)` / `finish()` return `(reasoning, content)` pieces."""

    def __init__(self, reasoning: bool) -> None:
        self._state = "reasoning" if reasoning else "start"
        self._buffer_reasoning = not reasoning
        self._buf = ""
        self._held = ""  # reasoning held back while reasoning is off (spontaneous <think>)
        self._lstrip_next = True  # drop whitespace at the start of reasoning / content
        self._reasoning_open_checked = not reasoning

    def feed(self, text: str) -> tuple[str, str]:
        """Consume `text`; return the reasoning and content that are now certain."""
        self._buf += text
        reasoning, content = [], []
        while True:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._buf = stripped[len(THINK_OPEN):]
                    self._state = "reasoning"
                    self._lstrip_next = True
                    continue
                if not stripped or THINK_OPEN.startswith(stripped):
                    break  # undecided
                self._state = "content"
                continue
            if self._state == "reasoning":
                if not self._reasoning_open_checked:
                    stripped = self._buf.lstrip()
                    if not stripped or (THINK_OPEN.startswith(stripped) and stripped != THINK_OPEN):
                        break
                    if stripped.startswith(THINK_OPEN):
                        self._buf = stripped[len(THINK_OPEN):]
                    self._reasoning_open_checked = True
                if self._lstrip_next:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        break
                    self._lstrip_next = False
                idx = self._buf.find(THINK_CLOSE)
                if idx >= 0:
                    piece, self._buf = self._buf[:idx], self._buf[idx + len(THINK_CLOSE):]
                    self._emit_reasoning(piece.rstrip(), reasoning, flush=True)
                    self._state = "content"
                    self._lstrip_next = True
                    continue
                n = safe_prefix_len(self._buf, (THINK_CLOSE,))
                # keep trailing whitespace back too: it is dropped if `</think>` follows
                n = len(self._buf[:n].rstrip()) if n else 0
                self._emit_reasoning(self._buf[:n], reasoning, flush=False)
                self._buf = self._buf[n:]
                break
            # content
            if self._lstrip_next:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._lstrip_next = False
            content.append(self._buf)
            self._buf = ""
            break
        return "".join(reasoning), "".join(content)

    def _emit_reasoning(self, piece: str, out: list[str], flush: bool) -> None:
        if self._buffer_reasoning:
            self._held += piece
            if flush:
                out.append(self._held)
                self._held = ""
        else:
            out.append(piece)

    def finish(self) -> tuple[str, str]:
        """End of output: flush what is held back."""
        buf, self._buf = self._buf, ""
        if self._state == "start":
            return "", buf.strip() and buf.lstrip()
        if self._state == "reasoning":
            if self._lstrip_next:
                buf = buf.lstrip()
            if self._buffer_reasoning:  # spontaneous, never closed: it was the answer
                return "", self._held + buf
            return buf.rstrip(), ""
        if self._lstrip_next:
            buf = buf.lstrip()
        return "", buf


def split_reasoning(text: str, reasoning: bool) -> tuple[str, str]:
    """Whole-output convenience: `(reasoning_content, content)`."""
    s = ReasoningSplitter(reasoning)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    return r1 + r2, c1 + c2
