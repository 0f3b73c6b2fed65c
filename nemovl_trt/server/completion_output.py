"""Shaping a /v1/completions generation: `text_completion` objects (streamed or not), `echo`, and the
legacy logprobs layout (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob}, `text_offset`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from nemovl_trt.server.completions_schema import CompletionRequest
from nemovl_trt.server.service import Generation, sse_response, warnings_of
from nemovl_trt.server.streaming import sse


class LegacyLogprobs:
    """Accumulates one choice's logprobs in the completions layout; offsets count characters of the text."""

    def __init__(self, start_offset: int = 0) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._offset = start_offset

    def add(self, entries: list[dict[str, Any] | None], first_is_null: bool = False) -> LegacyLogprobs:
        for j, e in enumerate(entries):
            if e is None:
                continue
            null = first_is_null and j == 0
            self.tokens.append(e["token"])
            self.token_logprobs.append(None if null else e["logprob"])
            self.top_logprobs.append(None if null else {t["token"]: t["logprob"] for t in e.get("top_logprobs", [])})
            self.text_offset.append(self._offset)
            self._offset += len(e["token"])
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def _prompt_text(req: CompletionRequest, prompt_entries: list[dict[str, Any]] | None) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    raw = b"".join(bytes(e["bytes"]) for e in prompt_entries or [])
    return raw.decode("utf-8", "replace")


def _choice(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class _Choices:
    def __init__(self, req: CompletionRequest) -> None:
        n = req.sampling.n
        self.req = req
        self.want = req.sampling.logprobs is not None
        self.text = [""] * n
        self.finish = [""] * n
        self.lps = [LegacyLogprobs() for _ in range(n)]
        self.echoed: set[int] = set()
        self.prompt_entries: list[dict[str, Any]] | None = None  # choice 0's first chunk carries them

    def feed(self, c: Any) -> tuple[str, dict[str, Any] | None]:
        """One chunk → (text of this step, with the echoed prompt first; its logprobs part or None)."""
        i = c.index
        lp = c.logprobs or {}
        if "prompt" in lp:
            self.prompt_entries = lp["prompt"]
        step = LegacyLogprobs(start_offset=len(self.text[i]))
        prefix = ""
        if self.req.echo and i not in self.echoed:
            self.echoed.add(i)
            prefix = _prompt_text(self.req, self.prompt_entries)
            if self.want and self.prompt_entries:
                step.add(self.prompt_entries, first_is_null=True)
        if self.want:
            step.add(lp.get("content", []))
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.lps[i], key).extend(getattr(step, key))
        text = prefix + c.text
        self.text[i] += text
        if c.finish_reason:
            self.finish[i] = c.finish_reason
        return text, (step.to_dict() if self.want else None)


async def complete_text(req: CompletionRequest, g: Generation) -> Response:
    choices = _Choices(req)
    if not await g.collect(choices.feed):
        return Response(status_code=499)
    g.account()
    out = [_choice(i, choices.text[i], choices.lps[i].to_dict() if choices.want else None, choices.finish[i] or "stop")
           for i in range(req.sampling.n)]
    body: dict[str, Any] = {"id": g.cid, "object": "text_completion", "created": int(time.time()), "model": g.model,
                            "choices": out, "usage": g.usage()}
    warnings = warnings_of(g.first)
    if warnings:
        body["warnings"] = warnings
    return JSONResponse(body)


async def stream_text(req: CompletionRequest, g: Generation) -> Response:
    choices = _Choices(req)

    def obj(choice_list: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": g.cid, "object": "text_completion", "created": g.created, "model": g.model,
                "choices": choice_list, **extra}

    async def events() -> AsyncIterator[bytes]:
        async for c in g.chunks():
            text, lp = choices.feed(c)
            if text or (lp and lp["tokens"]) or c.finish_reason:
                yield sse(obj([_choice(c.index, text, lp, c.finish_reason or None)]))
        if req.sampling.include_usage:
            yield sse(obj([], usage=g.usage()))

    return sse_response(g, events(), warnings_of(g.first))
