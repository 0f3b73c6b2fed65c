"""The request life cycle shared by /v1/chat/completions and /v1/completions: auth, body, model name,
readiness, validation, admission, the Triton stream (its first response awaited so errors before any output
are proper HTTP errors), metrics, disconnect watching and per-choice bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.state import ServerState
from nemovl_trt.server.triton_client import TritonChunk, TritonRequest

WARNING_HEADER = "X-NemoVL-Warning"
DISCONNECT_POLL_S = 0.1


def ascii_header(values: list[str]) -> str:
    return "; ".join(v.encode("ascii", "replace").decode().replace("\n", " ") for v in values)


def warnings_of(first: TritonChunk) -> list[str]:
    w = (first.info or {}).get("warnings") or []
    return [str(x) for x in w] if isinstance(w, list) else [str(w)]


def check_auth(state: ServerState, request: Request) -> None:
    key = state.settings.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "A valid API key is required (Authorization: Bearer <key>).",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_body(state: ServerState, request: Request) -> Any:
    cap = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"The request body is larger than the {cap} byte limit.", code="content_too_large")
    parts, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > cap:
            raise APIError(413, f"The request body is larger than the {cap} byte limit.", code="content_too_large")
        parts.append(piece)
    try:
        return json.loads(b"".join(parts))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from e


class Timing:
    """Time to first token and inter-token latency of one request."""

    def __init__(self, state: ServerState, t0: float) -> None:
        self.state, self.t0, self.last = state, t0, None

    def tokens(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.state.metrics.ttft.observe(now - self.t0)
        else:
            self.state.metrics.itl.observe(now - self.last)
        self.last = now


@dataclass
class Generation:
    """One running Triton stream and what the response shaping needs: the first chunk, the id, the start."""

    state: ServerState
    request: Request
    gen: AsyncIterator[TritonChunk]
    first: TritonChunk
    cid: str
    t0: float
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    completion: dict[int, int] = field(default_factory=dict)  # tokens per choice (last value seen)
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        self.timing = Timing(self.state, self.t0)
        self.prompt_tokens = self.first.prompt_tokens

    def seen(self, c: TritonChunk) -> None:
        """Bookkeeping for every chunk: timing, token counts."""
        if c.token_ids or c.text:
            self.timing.tokens()
        self.completion[c.index] = max(self.completion.get(c.index, 0), c.completion_tokens)
        self.prompt_tokens = c.prompt_tokens or self.prompt_tokens

    def usage(self) -> dict[str, int]:
        """OpenAI's usage: the prompt once, the completion tokens of every choice."""
        done = sum(self.completion.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def account(self) -> None:
        m = self.state.metrics
        m.prompt_tokens.inc(self.prompt_tokens)
        m.completion_tokens.inc(sum(self.completion.values()))
        m.observe_info(self.first.info)

    async def chunks(self) -> AsyncIterator[TritonChunk]:
        """Every chunk, the first included, until the stream ends."""
        c = self.first
        while True:
            self.seen(c)
            yield c
            try:
                c = await self.gen.__anext__()
            except StopAsyncIteration:
                return

    async def collect(self, on_chunk: Callable[[TritonChunk], None]) -> bool:
        """Feed every chunk to `on_chunk` while watching the client; False when it went away (the engine
        request is cancelled, a 499 is recorded)."""

        async def consume() -> None:
            async for c in self.chunks():
                on_chunk(c)

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_watch_disconnect(self.request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # client went away: stop the engine
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                self.state.metrics.cancelled.inc()
                return False
            task.result()
            return True
        finally:
            watcher.cancel()
            await self.gen.aclose()


async def _watch_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def sse_response(g: Generation, events: AsyncIterator[bytes], warnings: list[str]) -> StreamingResponse:
    """An SSE response whose stream releases the admission slot and records the metrics when it ends."""
    from nemovl_trt.server.streaming import SSE_DONE, SSE_MEDIA_TYPE, sse

    async def body() -> AsyncIterator[bytes]:
        status = "200"
        completed = False
        try:
            async for piece in events:
                yield piece
            completed = True
            g.account()
            yield SSE_DONE
        except APIError as e:
            status = str(e.status)
            yield sse(e.to_dict())
            yield SSE_DONE
        except Exception:
            status = "500"
            yield sse(APIError(500, "Internal server error.", code="internal_error").to_dict())
            yield SSE_DONE
        finally:
            if not completed and status == "200":
                g.state.metrics.cancelled.inc()
                status = "499"
            await g.gen.aclose()
            g.state.admission.release()
            g.state.metrics.requests.labels(status=status).inc()
            g.state.metrics.latency.observe(time.perf_counter() - g.t0)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if warnings:
        headers[WARNING_HEADER] = ascii_header(warnings)
    return StreamingResponse(body(), media_type=SSE_MEDIA_TYPE, headers=headers)


async def observed(state: ServerState, t0: float, handler: Awaitable[Response]) -> Response:
    """Run a generation handler, counting its status and latency (a stream counts itself when it ends)."""
    try:
        resp = await handler
    except APIError as e:
        state.metrics.requests.labels(status=str(e.status)).inc()
        state.metrics.latency.observe(time.perf_counter() - t0)
        raise
    except Exception:
        state.metrics.requests.labels(status="500").inc()
        state.metrics.latency.observe(time.perf_counter() - t0)
        raise
    if not isinstance(resp, StreamingResponse):
        state.metrics.requests.labels(status=str(resp.status_code)).inc()
        state.metrics.latency.observe(time.perf_counter() - t0)
    return resp


async def run_generation(state: ServerState, request: Request, t0: float, *, parse: Callable[[Any, Any], Any],
                         to_triton: Callable[[Any], Awaitable[TritonRequest]], id_prefix: str,
                         respond: Callable[[Any, Generation], Awaitable[Response]]) -> Response:
    """The life cycle of one generation request; `respond(parsed, generation)` shapes the answer (and for a
    stream takes over the admission slot: `sse_response` releases it)."""
    check_auth(state, request)
    body = await read_body(state, request)
    name = state.settings.model_name
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] != name:
        raise APIError(404, f"The model '{body['model']}' does not exist.", code="model_not_found", param="model")
    try:
        await state.require_ready()
    except APIError:
        parse(body, state.default_limits())  # a bad request is a 400 even while starting
        raise
    parsed = parse(body, await state.limits())
    await state.admission.acquire()
    released = False
    try:
        treq = await to_triton(parsed)
        cid = id_prefix + secrets.token_hex(12)
        gen = state.pool.generate(treq, cid)
        first = await _first(gen)  # errors before any output become proper HTTP errors
        g = Generation(state, request, gen, first, cid, t0, name)
        if parsed.sampling.stream:
            released = True  # the stream releases the slot when it ends
        return await respond(parsed, g)
    finally:
        if not released:
            state.admission.release()


async def _first(gen: AsyncIterator[TritonChunk]) -> TritonChunk:
    try:
        return await gen.__anext__()
    except StopAsyncIteration as e:
        raise APIError(500, "The inference server returned no response.", code="internal_error") from e
    except BaseException:
        await gen.aclose()
        raise
