"""Shaping a chat generation: per choice an `OutputAssembler` (tool calls, reasoning split) and its logprobs;
the non-streamed `chat.completion` or the SSE stream of `chat.completion.chunk`s."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response

from nemovl_trt.server.schemas import ChatRequest
from nemovl_trt.server.service import (
    WARNING_HEADER,
    Generation,
    ascii_header,
    json_response,
    sse_response,
    warnings_of,
)
from nemovl_trt.server.streaming import Final, OutputAssembler, chat_logprobs, chunk, merge_deltas, sse


def _reasoning(req: ChatRequest, g: Generation) -> bool:
    flag = (g.first.info or {}).get("reasoning")
    return flag if isinstance(flag, bool) else req.reasoning_hint


class _Choices:
    """The per-choice state of one chat generation."""

    def __init__(self, req: ChatRequest, g: Generation) -> None:
        reasoning = _reasoning(req, g)
        n = req.sampling.n
        self.want_logprobs = req.sampling.logprobs is not None
        self.asm = [OutputAssembler(reasoning, req.parse_tools) for _ in range(n)]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.finish: list[str] = [""] * n

    def feed(self, c: Any) -> tuple[dict[str, Any], list[dict[str, Any]] | None, str | None]:
        """One chunk → (delta, new logprob items or None, OpenAI finish_reason or None)."""
        i = c.index
        asm = self.asm[i]
        delta = asm.feed(c.text)
        items = chat_logprobs((c.logprobs or {}).get("content", [])) if self.want_logprobs else None
        if items:
            self.logprobs[i].extend(items)
        if not c.finish_reason:
            return delta, items, None
        delta = merge_deltas(delta, asm.finish())
        self.finish[i] = asm.finish_reason(c.finish_reason)
        return delta, items, self.finish[i]


async def complete_chat(req: ChatRequest, g: Generation) -> Response:
    """The non-streamed `chat.completion` (every choice, usage counting each choice's tokens)."""
    choices = _Choices(req, g)
    if not await g.collect(choices.feed):
        return Response(status_code=499)
    g.account()
    out = []
    for i, asm in enumerate(choices.asm):
        lp = {"content": choices.logprobs[i]} if choices.want_logprobs else None
        out.append({"index": i, "message": asm.message(), "logprobs": lp, "finish_reason": choices.finish[i] or "stop"})
    body: dict[str, Any] = {"id": g.cid, "object": "chat.completion", "created": int(time.time()), "model": g.model,
                            "choices": out, "usage": g.usage()}
    headers = {}
    warnings = warnings_of(g.first)
    if warnings:
        body["warnings"] = warnings
        headers[WARNING_HEADER] = ascii_header(warnings)
    return json_response(body, headers=headers)


async def stream_chat(req: ChatRequest, g: Generation) -> Response:
    """The SSE stream: a role chunk per choice, then deltas; each choice's finish_reason in exactly one chunk;
    with `include_usage` one more chunk with `choices: []` and the usage.

    Events ready at the same moment share one write: the role chunks go with the first response (already
    received when this runs, so nothing waits for it), and the last finish chunk with the usage chunk and
    [DONE] (`Final`)."""
    choices = _Choices(req, g)
    warnings = warnings_of(g.first)
    n = req.sampling.n

    async def events() -> AsyncIterator[bytes]:
        head = b"".join(sse(chunk(g.cid, g.created, g.model, {"role": "assistant", "content": ""}, index=i,
                                  **({"warnings": warnings} if warnings and i == 0 else {}))) for i in range(n))
        finished = 0
        async for c in g.chunks():
            delta, items, finish = choices.feed(c)
            lp = {"content": items} if items else None
            piece = sse(chunk(g.cid, g.created, g.model, delta, finish, index=c.index, logprobs=lp)) \
                if finish or delta or lp else b""
            if head:
                piece, head = head + piece, b""
            if finish:
                finished += 1
                if finished == n:  # every choice is done: nothing more comes from Triton
                    if req.include_usage:
                        piece += sse(chunk(g.cid, g.created, g.model, None, usage=g.usage()))
                    yield Final(piece)
                    return
            if piece:
                yield piece
        if head:
            yield head
        if req.include_usage:
            yield sse(chunk(g.cid, g.created, g.model, None, usage=g.usage()))

    return sse_response(g, events(), warnings)
