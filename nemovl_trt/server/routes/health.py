"""GET /v1/health/ready, /health, /v1/health/live, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

router = APIRouter()


async def _ready(request: Request) -> JSONResponse:
    await request.app.state.nemovl.require_ready()
    return JSONResponse({"object": "health.response", "message": "Service is ready.", "status": "ready"})


@router.get("/v1/health/ready")
async def health_ready(request: Request) -> JSONResponse:
    return await _ready(request)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    return await _ready(request)


@router.get("/v1/health/live")
async def health_live() -> JSONResponse:
    return JSONResponse({"object": "health.response", "message": "Service is live.", "status": "live"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.nemovl.metrics
    return Response(m.render(), media_type=m.content_type)
