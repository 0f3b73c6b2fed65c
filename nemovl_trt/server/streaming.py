"""Output assembly (tool calls → reasoning split) and OpenAI chunk / SSE framing.

`OutputAssembler` is shared by the streaming and the non-streaming path, so both give the same
content, reasoning and tool calls for the same generated text however Triton chunks it.
"""

from __future__ import annotations

import json
from typing import Any

from nemovl_trt.server.reasoning import ReasoningSplitter
from nemovl_trt.server.tools import ToolCallExtractor

try:  # optional speed-up (wheels for x86_64 and aarch64); the json module gives the same documents
    import orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    orjson = None  # type: ignore[assignment]

SSE_DONE = b"data: [DONE]\n\n"
SSE_MEDIA_TYPE = "text/event-stream"


class Final(bytes):
    """The last SSE piece of a generation (its finish chunk, the usage chunk): `sse_response` appends
    `data: [DONE]` and ends the HTTP body in the same write instead of three more."""


def _has_logprobs(obj: dict[str, Any]) -> bool:
    choices = obj.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("logprobs") for c in choices)


def dumps(obj: Any) -> bytes:
    """`obj` as compact UTF-8 JSON. orjson when it gives the json module's document: not for logprobs (orjson
    writes a non-finite float as null, json as -Infinity, which clients read back as a float) nor for what
    orjson refuses (integers beyond 64 bits, non-string keys, lone surrogates: escaped by json instead)."""
    if orjson is not None and not (isinstance(obj, dict) and _has_logprobs(obj)):
        try:
            return orjson.dumps(obj)
        except TypeError:  # orjson.JSONEncodeError
            pass
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate: \\u-escape it rather than fail the request
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as JSON: `data: {...}\\n\\n`."""
    return b"data: " + dumps(obj) + b"\n\n"


class OutputAssembler:
    """Generated text → OpenAI delta pieces (`content`, `reasoning_content`, `tool_calls`)."""

    def __init__(self, reasoning: bool, parse_tools: bool) -> None:
        self.tools = ToolCallExtractor(parse_tools)
        self.splitter = ReasoningSplitter(reasoning)
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []

    def _delta(self, text: str, calls: list[dict[str, Any]], final: bool) -> dict[str, Any]:
        r, c = self.splitter.feed(text)
        if final:
            r2, c2 = self.splitter.finish()
            r, c = r + r2, c + c2
        delta: dict[str, Any] = {}
        if r:
            delta["reasoning_content"] = r
            self.reasoning.append(r)
        if c:
            delta["content"] = c
            self.content.append(c)
        if calls:
            delta["tool_calls"] = calls
            self.tool_calls.extend(calls)
        return delta

    def feed(self, text: str) -> dict[str, Any]:
        """New text from the engine → the delta that is certain now (possibly empty)."""
        t, calls = self.tools.feed(text)
        return self._delta(t, calls, final=False)

    def finish(self) -> dict[str, Any]:
        """End of generation → the rest of the delta."""
        t, calls = self.tools.finish()
        return self._delta(t, calls, final=True)

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI finish_reason: "tool_calls" when the model called a tool and stopped by itself."""
        if self.tool_calls and engine_reason == "stop":
            return "tool_calls"
        return engine_reason or "stop"

    def message(self) -> dict[str, Any]:
        """The non-streaming `choices[0].message`."""
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        reasoning = "".join(self.reasoning)
        msg["reasoning_content"] = reasoning or None
        if self.tool_calls:
            msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls]
        return msg


def chunk(cid: str, created: int, model: str, delta: dict[str, Any] | None,
          finish_reason: str | None = None, *, index: int = 0, logprobs: dict[str, Any] | None = None,
          **extra: Any) -> dict[str, Any]:
    """A `chat.completion.chunk` with one choice (or none when `delta` is None: the usage chunk)."""
    obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": []}
    if delta is not None:
        obj["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    obj.update(extra)
    return obj


def chat_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nemovl model's logprob entries → chat's `logprobs.content` items (token, logprob, bytes,
    top_logprobs)."""
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                              for t in e.get("top_logprobs", [])]} for e in entries]


def merge_deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Concatenate two deltas (text fields joined, tool call lists appended)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out
