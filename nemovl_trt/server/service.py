"""The request life cycle shared by /v1/chat/completions and /v1/completions: auth, body, model name,
readiness, validation, admission, the Triton stream(s) (one per prompt, merged; each first response awaited
so errors before any output are proper HTTP errors), the re-run of a non-streamed request whose replica
failed mid-generation, metrics, disconnect watching and per-choice bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.state import ServerState
from nemovl_trt.server.streaming import SSE_DONE, SSE_MEDIA_TYPE, Final, dumps, sse
from nemovl_trt.server.triton_client import ReplicaLost, TritonChunk, TritonRequest
from nemovl_trt.serving.edge import PARSED_BODY_KEY
from nemovl_trt.serving.guards import strict_loads

WARNING_HEADER = "X-NemoVL-Warning"
DISCONNECT_POLL_S = 0.1
_NO_BODY = object()


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


def json_response(body: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """An application/json response rendered once by `streaming.dumps` (orjson when it is exact)."""
    return Response(dumps(body), status_code=status_code, headers=headers, media_type="application/json")


def decode_body(raw: bytes) -> Any:
    """A request body → its JSON value, as json.loads reads it (orjson first when that is exact)."""
    ok, value = strict_loads(raw)
    if ok:
        return value
    try:
        return json.loads(raw)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError: too deep — all the client's mistake
    except (ValueError, RecursionError) as e:
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from e


async def read_body(state: ServerState, request: Request) -> Any:
    """The decoded JSON body: the one the edge already decoded and checked (serving/edge.py passes it in the
    request scope, so a body is parsed once), else read here up to `max_body_bytes` (413) and decoded (400)."""
    pre = request.scope.get("state", {}).pop(PARSED_BODY_KEY, _NO_BODY)
    if pre is not _NO_BODY:
        return pre
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
    return decode_body(b"".join(parts))


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
            # Cut from outside (--request-timeout, shutdown, the handler cancelled): `consume` is still
            # suspended inside gen.__anext__, so aclose() alone would fail ("already running") and the gRPC
            # call would live on. Cancelling the task raises inside the generator, whose finally cancels the
            # call, and Triton cancels the engine request.
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self.gen.aclose()


async def _watch_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


class SSEResponse(Response):
    """`text/event-stream` from an async iterator of bytes, one write per piece; a `Final` piece ends the body
    in the same write. Leaner than Starlette's StreamingResponse (no task group per request); like it, a
    client disconnect (`http.disconnect`) cancels the stream, so the Triton call and the engine request end."""

    media_type = SSE_MEDIA_TYPE

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.body_iterator = body
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for piece in self.body_iterator:
                final = isinstance(piece, Final)
                await send({"type": "http.response.body", "body": bytes(piece), "more_body": not final})
                if final:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: a normal end of this response, not a cancelled request
        except OSError:  # the connection broke under us: the client is gone as well
            pass
        finally:
            watcher.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse_response(g: Generation, events: AsyncIterator[bytes], warnings: list[str]) -> SSEResponse:
    """An SSE response whose stream releases the admission slot and records the metrics when it ends. A `Final`
    piece from `events` is its last: `data: [DONE]` goes out with it."""

    async def body() -> AsyncIterator[bytes]:
        status = "200"
        completed = False
        try:
            async for piece in events:
                if isinstance(piece, Final):
                    completed = True
                    g.account()
                    yield Final(piece + SSE_DONE)
                    return
                yield piece
            completed = True
            g.account()
            yield Final(SSE_DONE)
        except APIError as e:
            status = str(e.status)
            yield Final(sse(e.to_dict()) + SSE_DONE)
        except Exception:
            status = "500"
            yield Final(sse(APIError(500, "Internal server error.", code="internal_error").to_dict()) + SSE_DONE)
        finally:
            if not completed and status == "200":
                g.state.metrics.cancelled.inc()
                status = "499"
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
            await g.gen.aclose()
            g.state.admission.release()
            g.state.metrics.requests.labels(status=status).inc()
            g.state.metrics.latency.observe(time.perf_counter() - g.t0)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if warnings:
        headers[WARNING_HEADER] = ascii_header(warnings)
    return SSEResponse(body(), headers)


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
    if not isinstance(resp, SSEResponse):
        state.metrics.requests.labels(status=str(resp.status_code)).inc()
        state.metrics.latency.observe(time.perf_counter() - t0)
    return resp


class MergedStream:
    """Several `nemovl` streams as one (several prompts of a /v1/completions request): stream i's choice
    indices shifted by `offsets[i]` (prompt-major: the engine choices of the streams before it), every chunk's
    prompt_tokens the total of all prompts (so the usage counts each prompt once). The first chunk of every
    stream has been awaited already (errors before any output are HTTP errors). The first error of any stream
    is raised to the consumer; `aclose` closes every stream."""

    def __init__(self, streams: list[AsyncIterator[TritonChunk]], firsts: list[TritonChunk],
                 offsets: list[int]) -> None:
        self.prompt_tokens = sum(f.prompt_tokens for f in firsts)
        self._offsets = offsets
        self._streams = streams
        self._queue: asyncio.Queue[tuple[int, TritonChunk | BaseException | None]] = asyncio.Queue()
        self._live = len(streams)
        self.first = self._shift(0, firsts[0])
        for i, f in enumerate(firsts[1:], start=1):
            self._queue.put_nowait((i, f))
        self._pumps = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]

    def _shift(self, i: int, c: TritonChunk) -> TritonChunk:
        return replace(c, index=self._offsets[i] + c.index, prompt_tokens=self.prompt_tokens)

    async def _pump(self, i: int, stream: AsyncIterator[TritonChunk]) -> None:
        try:
            async for c in stream:
                await self._queue.put((i, c))
            await self._queue.put((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await self._queue.put((i, e))

    def __aiter__(self) -> MergedStream:
        return self

    async def __anext__(self) -> TritonChunk:
        while self._live:
            i, item = await self._queue.get()
            if item is None:
                self._live -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            return self._shift(i, item)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        for t in self._pumps:
            t.cancel()
        for t in self._pumps:
            with contextlib.suppress(BaseException):
                await t
        await _close_all(self._streams)


async def _close_all(streams: list[AsyncIterator[TritonChunk]]) -> None:
    for s in streams:
        with contextlib.suppress(BaseException):
            await s.aclose()  # type: ignore[attr-defined]


async def _first(stream: AsyncIterator[TritonChunk]) -> TritonChunk:
    try:
        return await stream.__anext__()
    except StopAsyncIteration as e:
        raise APIError(500, "The inference server returned no response.", code="internal_error") from e


async def _first_of_each(streams: list[AsyncIterator[TritonChunk]]) -> list[TritonChunk]:
    """The first chunk of every stream, awaited together; on any error every stream is closed."""
    if len(streams) == 1:  # the common case, without a task
        try:
            return [await _first(streams[0])]
        except BaseException:
            await _close_all(streams)
            raise
    tasks = [asyncio.ensure_future(_first(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_all(streams)
        raise


async def start_generation(state: ServerState, request: Request, t0: float, treqs: list[TritonRequest],
                           cid: str, exclude: frozenset[int] = frozenset()) -> Generation:
    """Send every engine request (one per prompt; replicas in `exclude` not used) and await the first chunk
    of each, so errors before any output are proper HTTP errors. Several requests: one merged stream, choice
    indices prompt-major (request i's choice j is the sum of the earlier requests' `n` + j)."""
    ids = [cid] if len(treqs) == 1 else [f"{cid}-{i}" for i in range(len(treqs))]
    streams = [state.pool.generate(t, rid, exclude=exclude) for t, rid in zip(treqs, ids, strict=True)]
    firsts = await _first_of_each(streams)
    if len(streams) == 1:
        return Generation(state, request, streams[0], firsts[0], cid, t0, state.settings.model_name)
    offsets = list(itertools.accumulate((t.n for t in treqs[:-1]), initial=0))
    merged = MergedStream(streams, firsts, offsets)
    return Generation(state, request, merged, merged.first, cid, t0, state.settings.model_name)


async def run_generation(state: ServerState, request: Request, t0: float, *, parse: Callable[[Any, Any], Any],
                         to_triton: Callable[[Any], Awaitable[TritonRequest | list[TritonRequest]]],
                         id_prefix: str, respond: Callable[[Any, Generation], Awaitable[Response]]) -> Response:
    """The life cycle of one generation request; `to_triton(parsed)` gives its engine request, or one per
    prompt (all under this one admission slot, their streams merged); `respond(parsed, generation)` shapes
    the answer (and for a stream takes over the admission slot: `sse_response` releases it).

    A non-streamed request whose replica fails at the transport level mid-generation (`ReplicaLost`: no
    token reached the client, it gets the whole answer at the end) is run again once from scratch on another
    UP replica, with fresh response state (`respond` is called anew); a stream that sent bytes keeps ending
    with an error event (docs/replicas.md)."""
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
        made = await to_triton(parsed)
        treqs = made if isinstance(made, list) else [made]
        cid = id_prefix + secrets.token_hex(12)
        g = await start_generation(state, request, t0, treqs, cid)
        if parsed.sampling.stream:
            released = True  # the stream releases the slot when it ends
            return await respond(parsed, g)
        try:
            return await respond(parsed, g)
        except ReplicaLost as e:
            lost = e
            if not state.pool.retry_lost(lost, cid):
                raise
        again = await start_generation(state, request, t0, treqs, cid, exclude=frozenset({lost.replica}))
        again.timing = g.timing  # one request: its time to first token is observed once
        return await respond(parsed, again)
    finally:
        if not released:
            state.admission.release()
