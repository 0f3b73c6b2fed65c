"""Shaping a /v1/completions generation: `text_completion` objects (streamed or not), `echo`, and the
legacy logprobs layout (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob}, `text_offset`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
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


def _prompt_text(prompt: str | list[int], prompt_entries: list[dict[str, Any]] | None) -> str:
    if isinstance(prompt, str):
        return prompt
    raw = b"".join(bytes(e["bytes"]) for e in prompt_entries or [])
    return raw.decode("utf-8", "replace")


def _choice(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class _Choices:
    """Every choice of a request: prompt i's choice j is index i * n + j (as OpenAI indexes them)."""

    def __init__(self, req: CompletionRequest) -> None:
        self.req = req
        self.n = req.sampling.n
        total = len(req.prompts) * self.n
        self.want = req.sampling.logprobs is not None
        self.text = [""] * total
        self.finish = [""] * total
        self.lps = [LegacyLogprobs() for _ in range(total)]
        self.echoed: set[int] = set()
        self.prompt_entries: dict[int, list[dict[str, Any]]] = {}  # per prompt: the first chunk carrying them

    def feed(self, c: Any) -> tuple[str, dict[str, Any] | None]:
        """One chunk → (text of this step, with the echoed prompt first; its logprobs part or None)."""
        i = c.index
        p = i // self.n
        lp = c.logprobs or {}
        if "prompt" in lp:
            self.prompt_entries.setdefault(p, lp["prompt"])
        step = LegacyLogprobs(start_offset=len(self.text[i]))
        prefix = ""
        if self.req.echo and i not in self.echoed:
            self.echoed.add(i)
            prefix = _prompt_text(self.req.prompts[p], self.prompt_entries.get(p))
            if self.want and self.prompt_entries.get(p):
                step.add(self.prompt_entries[p], first_is_null=True)
        if self.want:
            step.add(lp.get("content", []))
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.lps[i], key).extend(getattr(step, key))
        text = prefix + c.text
        self.text[i] += text
        if c.finish_reason:
            self.finish[i] = c.finish_reason
        return text, (step.to_dict() if self.want else None)


def cumulative_logprob(chunks: list[Any]) -> float:
    """Sum of the chosen tokens' logprobs over one candidate's chunks (the eos token, which the entry model
    leaves out of `content`, is not counted)."""
    return sum(float(e["logprob"]) for c in chunks for e in (c.logprobs or {}).get("content", []) if e)


def best_of(req: CompletionRequest, chunks: list[Any]) -> list[Any]:
    """best_of > n: the chunks of the n candidates of each prompt with the highest cumulative logprob (ties:
    the lower candidate index), re-indexed prompt-major (prompt i's k-th best is i * n + k). Candidate
    indices in `chunks` are prompt-major over best_of. The logprobs are dropped when the client did not
    ask for them; prompt logprobs (echo) are moved onto each kept choice's first chunk."""
    m, n = req.sampling.best_of, req.sampling.n
    per: dict[int, list[Any]] = {}
    prompt_lp: dict[int, Any] = {}
    for c in chunks:
        per.setdefault(c.index, []).append(c)
        if c.logprobs and "prompt" in c.logprobs:
            prompt_lp.setdefault(c.index // m, c.logprobs["prompt"])
    out = []
    for p in range(len(req.prompts)):
        cands = sorted(range(p * m, (p + 1) * m), key=lambda k: (-cumulative_logprob(per.get(k, [])), k))
        for rank, k in enumerate(cands[:n]):
            for j, c in enumerate(per.get(k, [])):
                lp = dict(c.logprobs or {}) if req.sampling.logprobs is not None else {}
                lp.pop("prompt", None)
                if j == 0 and p in prompt_lp:
                    lp["prompt"] = prompt_lp[p]
                out.append(replace(c, index=p * n + rank, logprobs=lp or None))
    return out


async def complete_text(req: CompletionRequest, g: Generation) -> Response:
    choices = _Choices(req)
    seen: list[Any] = []
    if not await g.collect(seen.append if req.ranked else choices.feed):
        return Response(status_code=499)
    for c in best_of(req, seen) if req.ranked else ():
        choices.feed(c)
    g.account()
    out = [_choice(i, choices.text[i], choices.lps[i].to_dict() if choices.want else None, choices.finish[i] or "stop")
           for i in range(len(choices.text))]
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
