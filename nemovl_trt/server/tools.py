"""Tool calls: the model writes `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`; clients
want OpenAI `tool_calls` (`id` ≥ 9 chars, `type: "function"`, `function.arguments` a JSON string).

`ToolCallExtractor` works incrementally (streaming and non-streaming share it): text outside the tags
passes through; a complete block becomes tool calls; a block that is not valid JSON (or never closes and
does not parse) is passed through as text, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from nemovl_trt.server.textscan import safe_prefix_len

TOOL_OPEN = "<TOOLCALL>"
TOOL_CLOSE = "</TOOLCALL>"
TOOL_ID_HEX = 24  # "call_" + 24 hex characters = 29 characters


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id (29 characters)."""
    return "call_" + secrets.token_hex(TOOL_ID_HEX // 2)


def parse_tool_block(block: str) -> list[dict[str, str]] | None:
    """JSON inside `<TOOLCALL>…</TOOLCALL>` → `[{"name", "arguments" (JSON string)}]`, or None if malformed."""
    try:
        data = json.loads(block)
    except (json.JSONDecodeError, ValueError):
        return None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        return None
    calls = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        args: Any = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                json.loads(args)
            except (json.JSONDecodeError, ValueError):
                return None
            arg_text = args
        else:
            arg_text = json.dumps(args, ensure_ascii=False)
        calls.append({"name": item["name"], "arguments": arg_text})
    return calls


class ToolCallExtractor:
    """Incremental `<TOOLCALL>` extractor; `feed`/`finish` return `(text, tool_calls)` where each tool call
    is the OpenAI object `{"index", "id", "type", "function": {"name", "arguments"}}`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._buf = ""
        self._in_call = False
        self.count = 0  # tool calls emitted so far

    def _make(self, calls: list[dict[str, str]]) -> list[dict[str, Any]]:
        out = []
        for c in calls:
            out.append({"index": self.count, "id": new_tool_call_id(), "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]}})
            self.count += 1
        return out

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Consume `text`; return pass-through text and the tool calls completed by it."""
        if not self.enabled:
            return text, []
        self._buf += text
        out_text: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            if not self._in_call:
                idx = self._buf.find(TOOL_OPEN)
                if idx >= 0:
                    out_text.append(self._buf[:idx])
                    self._buf = self._buf[idx + len(TOOL_OPEN):]
                    self._in_call = True
                    continue
                n = safe_prefix_len(self._buf, (TOOL_OPEN,))
                out_text.append(self._buf[:n])
                self._buf = self._buf[n:]
                break
            idx = self._buf.find(TOOL_CLOSE)
            if idx < 0:
                break
            block, self._buf = self._buf[:idx], self._buf[idx + len(TOOL_CLOSE):]
            self._in_call = False
            parsed = parse_tool_block(block)
            if parsed is None:
                out_text.append(TOOL_OPEN + block + TOOL_CLOSE)
            else:
                calls.extend(self._make(parsed))
        return "".join(out_text), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """End of output: an unclosed block is parsed if it is complete JSON, else returned as text."""
        if not self.enabled:
            return "", []
        buf, self._buf = self._buf, ""
        if not self._in_call:
            return buf, []
        self._in_call = False
        parsed = parse_tool_block(buf)
        if parsed is None:
            return TOOL_OPEN + buf, []
        return "", self._make(parsed)
