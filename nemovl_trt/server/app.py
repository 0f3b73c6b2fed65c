"""The OpenAI-compatible ASGI app: `create_app(settings) -> FastAPI`.

A protocol adapter only. Routers per endpoint (routes/): chat, completions, models + metadata, health +
metrics; the request life cycle they share (service.py); validation (schemas.py, completions_schema.py,
sampling_schema.py, response_format.py); a validated request → engine inputs (engine_inputs.py); the
`nemovl` entry model over gRPC streaming (triton_client.py); answer shaping (chat_output.py,
completion_output.py, streaming.py); metrics (metrics.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.routes import chat, completions, health, models
from nemovl_trt.server.settings import Settings
from nemovl_trt.server.state import Admission, ServerState
from nemovl_trt.server.streaming import merge_deltas

__all__ = ["Admission", "ServerState", "create_app", "merge_deltas"]


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure in the OpenAI error envelope, never FastAPI's `{"detail": ...}`."""

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
    _install_error_handlers(app)
    for module in (chat, completions, models, health):
        app.include_router(module.router)
    return app
