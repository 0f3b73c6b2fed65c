"""The OpenAI-compatible ASGI app: `create_app(settings) -> FastAPI`.

A protocol adapter only: validate (schemas.py), fetch media (media.py), call the `nemovl` entry model
over gRPC streaming (triton_client.py), shape the answer (streaming.py), export metrics (metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.media import MediaPolicy, load_media
from nemovl_trt.server.metrics import Metrics
from nemovl_trt.server.schemas import ChatRequest, ModelLimits, parse_chat_request
from nemovl_trt.server.settings import Settings
from nemovl_trt.server.streaming import SSE_DONE, SSE_MEDIA_TYPE, OutputAssembler, chunk, sse
from nemovl_trt.server.triton_client import TritonChunk, TritonPool, TritonRequest

WARNING_HEADER = "X-NemoVL-Warning"
DISCONNECT_POLL_S = 0.1


class Admission:
    """Bounded admission: `max_concurrent` requests run, `max_queued` wait, the rest get 429."""

    def __init__(self, max_concurrent: int, max_queued: int, retry_after_s: int, metrics: Metrics) -> None:
        self._sem = asyncio.Semaphore(max_concurrent)
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.waiting = 0
        self.active = 0
        self._metrics = metrics

    async def acquire(self) -> None:
        if self._sem.locked() and self.waiting >= self.max_queued:
            raise APIError(429, "The server is at capacity; retry shortly.", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.waiting += 1
        self._metrics.queue_depth.set(self.waiting)
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
            self._metrics.queue_depth.set(self.waiting)
        self.active += 1
        self._metrics.in_flight.set(self.active)

    def release(self) -> None:
        self.active -= 1
        self._metrics.in_flight.set(self.active)
        self._sem.release()


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers)


def _ascii_header(values: list[str]) -> str:
    return "; ".join(v.encode("ascii", "replace").decode().replace("\n", " ") for v in values)


def _int_param(params: dict[str, str], key: str, default: int | None) -> int | None:
    try:
        return int(params[key])
    except (KeyError, ValueError):
        return default


class ServerState:
    """Everything a request handler needs, created once per app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool = TritonPool(settings.triton_urls, settings.triton_model, settings.triton_timeout_s,
                               settings.ready_cache_s)
        self.admission = Admission(settings.max_concurrent, settings.max_queued, settings.retry_after_s, self.metrics)
        self.media_policy = MediaPolicy(settings.max_media_bytes, settings.media_timeout_s,
                                        settings.media_max_redirects, list(settings.allow_media_hosts))
        self.http: httpx.AsyncClient | None = None
        self.created = int(time.time())
        self.draining = False

    async def require_ready(self) -> None:
        if self.draining or not await self.pool.ready():
            raise APIError(503, "The model is not ready yet (Triton or a model in its repository is loading "
                                "or unavailable).", code="model_not_ready")

    def default_limits(self) -> ModelLimits:
        s = self.settings
        return ModelLimits(max_seq_len=None, max_images=s.default_max_images, max_num_tiles=s.default_max_num_tiles,
                           max_video_frames=s.default_max_video_frames)

    async def limits(self) -> ModelLimits:
        p = await self.pool.model_parameters()
        s = self.settings
        return ModelLimits(max_seq_len=_int_param(p, "max_seq_len", None),
                           max_images=_int_param(p, "max_images", s.default_max_images) or s.default_max_images,
                           max_num_tiles=_int_param(p, "max_num_tiles", s.default_max_num_tiles) or s.default_max_num_tiles,
                           max_video_frames=_int_param(p, "max_video_frames", s.default_max_video_frames)
                           or s.default_max_video_frames)


def create_app(settings: Settings) -> FastAPI:
    """Build the ASGI app for `settings` (Triton is contacted lazily, so the app starts without it)."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        try:
            yield
        finally:
            state.draining = True
            await state.http.aclose()
            await state.pool.close()

    app = FastAPI(title="nemovl OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.nemovl = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"No route {request.method} {request.url.path}.", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                           code="method_not_allowed", headers=dict(exc.headers or {}))
        else:
            err = APIError(exc.status_code, str(exc.detail), code=None, headers=dict(exc.headers or {}))
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, "The request is malformed.", code="invalid_request"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(500, "Internal server error.", code="internal_error"))

    def check_auth(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "A valid API key is required (Authorization: Bearer <key>).",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> Any:
        cap = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise APIError(413, f"The request body is larger than the {cap} byte limit.", code="content_too_large")
        parts, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > cap:
                raise APIError(413, f"The request body is larger than the {cap} byte limit.",
                               code="content_too_large")
            parts.append(piece)
        try:
            return json.loads(b"".join(parts))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from e

    async def model_entry() -> dict[str, Any]:
        try:
            max_len = (await state.limits()).max_seq_len
        except APIError:
            max_len = None
        return {"id": settings.model_name, "object": "model", "created": state.created, "owned_by": "nvidia",
                "root": settings.model_name, "max_model_len": max_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [await model_entry()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
        return await model_entry()

    async def ready_response() -> JSONResponse:
        await state.require_ready()
        return JSONResponse({"object": "health.response", "message": "Service is ready.", "status": "ready"})

    @app.get("/v1/health/ready")
    async def health_ready() -> JSONResponse:
        return await ready_response()

    @app.get("/health")
    async def health() -> JSONResponse:
        return await ready_response()

    @app.get("/v1/health/live")
    async def health_live() -> JSONResponse:
        return JSONResponse({"object": "health.response", "message": "Service is live.", "status": "live"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/metadata")
    async def metadata() -> dict[str, Any]:
        p = await state.pool.model_parameters()
        lim = await state.limits()
        return {"model_id": p.get("model_id") or settings.model_name, "served_model_name": settings.model_name,
                "target": p.get("target"), "llm_precision": p.get("llm_precision"),
                "vision_precision": p.get("vision_precision"),
                "video_pruning_rate": float(p["video_pruning_rate"]) if p.get("video_pruning_rate") else 0.0,
                "limits": {"max_seq_len": lim.max_seq_len, "max_num_tiles": lim.max_num_tiles,
                           "max_images": lim.max_images, "max_video_frames": lim.max_video_frames},
                "triton_endpoints": len(settings.triton_urls), "triton_model": settings.triton_model}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            resp = await _chat(request, t0)
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

    async def _chat(request: Request, t0: float) -> Response:
        check_auth(request)
        body = await read_body(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] != settings.model_name:
            raise APIError(404, f"The model '{body['model']}' does not exist.", code="model_not_found", param="model")
        try:
            await state.require_ready()
        except APIError:
            parse_chat_request(body, state.default_limits())  # a bad request is a 400 even while starting
            raise
        req = parse_chat_request(body, await state.limits())
        await state.admission.acquire()
        released = False
        try:
            treq = await _to_triton(req)
            cid = "chatcmpl-" + secrets.token_hex(12)
            gen = state.pool.generate(treq, cid)
            first = await _first(gen)  # errors before any output become proper HTTP errors
            if req.stream:
                released = True  # the stream releases the slot when it ends
                return _stream(request, req, gen, first, cid, t0)
            return await _complete(request, req, gen, first, cid, t0)
        finally:
            if not released:
                state.admission.release()

    async def _to_triton(req: ChatRequest) -> TritonRequest:
        refs = req.images + ([req.video] if req.video else [])
        datas = await asyncio.gather(*(load_media(r.url, state.media_policy, r.kind, r.param, state.http)
                                       for r in refs))
        images = list(datas[:len(req.images)])
        video = datas[-1] if req.video else None
        return TritonRequest(messages=req.messages, images=images, video=video, tools=req.tools, params=req.params)

    async def _first(gen: AsyncIterator[TritonChunk]) -> TritonChunk:
        try:
            return await gen.__anext__()
        except StopAsyncIteration as e:
            raise APIError(500, "The inference server returned no response.", code="internal_error") from e
        except BaseException:
            await gen.aclose()
            raise

    def _account(first: TritonChunk, last: TritonChunk) -> None:
        m = state.metrics
        m.prompt_tokens.inc(last.prompt_tokens or first.prompt_tokens)
        m.completion_tokens.inc(last.completion_tokens)
        m.observe_info(first.info)

    def _warnings(first: TritonChunk) -> list[str]:
        w = (first.info or {}).get("warnings") or []
        return [str(x) for x in w] if isinstance(w, list) else [str(w)]

    def _reasoning(req: ChatRequest, first: TritonChunk) -> bool:
        flag = (first.info or {}).get("reasoning")
        return flag if isinstance(flag, bool) else req.reasoning_hint

    class _Timing:
        def __init__(self, t0: float) -> None:
            self.t0, self.last = t0, None

        def tokens(self) -> None:
            now = time.perf_counter()
            if self.last is None:
                state.metrics.ttft.observe(now - self.t0)
            else:
                state.metrics.itl.observe(now - self.last)
            self.last = now

    async def _watch_disconnect(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    async def _complete(request: Request, req: ChatRequest, gen: AsyncIterator[TritonChunk], first: TritonChunk,
                        cid: str, t0: float) -> Response:
        asm = OutputAssembler(_reasoning(req, first), req.parse_tools)
        timing = _Timing(t0)

        async def consume() -> TritonChunk:
            last = first
            c = first
            while True:
                if c.token_ids or c.text:
                    timing.tokens()
                asm.feed(c.text)
                last = c
                if c.finish_reason:
                    return last
                c = await gen.__anext__()

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_watch_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # client went away: stop the engine
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                state.metrics.cancelled.inc()
                return Response(status_code=499)
            last = task.result()
        finally:
            watcher.cancel()
            await gen.aclose()
        asm.finish()
        _account(first, last)
        warnings = _warnings(first)
        body: dict[str, Any] = {
            "id": cid, "object": "chat.completion", "created": int(time.time()), "model": settings.model_name,
            "choices": [{"index": 0, "message": asm.message(), "logprobs": None,
                         "finish_reason": asm.finish_reason(last.finish_reason)}],
            "usage": {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                      "total_tokens": last.prompt_tokens + last.completion_tokens},
        }
        headers = {}
        if warnings:
            body["warnings"] = warnings
            headers[WARNING_HEADER] = _ascii_header(warnings)
        return JSONResponse(body, headers=headers)

    def _stream(request: Request, req: ChatRequest, gen: AsyncIterator[TritonChunk], first: TritonChunk, cid: str,
                t0: float) -> StreamingResponse:
        created = int(time.time())
        model = settings.model_name
        asm = OutputAssembler(_reasoning(req, first), req.parse_tools)
        warnings = _warnings(first)
        timing = _Timing(t0)

        async def events() -> AsyncIterator[bytes]:
            status = "200"
            last = first
            completed = False
            try:
                extra = {"warnings": warnings} if warnings else {}
                yield sse(chunk(cid, created, model, {"role": "assistant", "content": ""}, **extra))
                c = first
                while True:
                    if c.token_ids or c.text:
                        timing.tokens()
                    last = c
                    delta = asm.feed(c.text)
                    if c.finish_reason:
                        delta = merge_deltas(delta, asm.finish())
                        yield sse(chunk(cid, created, model, delta, asm.finish_reason(c.finish_reason)))
                        break
                    if delta:
                        yield sse(chunk(cid, created, model, delta))
                    c = await gen.__anext__()
                if req.include_usage:
                    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                             "total_tokens": last.prompt_tokens + last.completion_tokens}
                    yield sse(chunk(cid, created, model, None, usage=usage))
                completed = True
                _account(first, last)
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
                    state.metrics.cancelled.inc()
                    status = "499"
                await gen.aclose()
                state.admission.release()
                state.metrics.requests.labels(status=status).inc()
                state.metrics.latency.observe(time.perf_counter() - t0)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if warnings:
            headers[WARNING_HEADER] = _ascii_header(warnings)
        return StreamingResponse(events(), media_type=SSE_MEDIA_TYPE, headers=headers)

    return app


def merge_deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Concatenate two deltas (text fields joined, tool call lists appended)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out
