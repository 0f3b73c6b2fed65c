"""GET /v1/models, /v1/models/{id}, /v1/metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from nemovl_trt.server.errors import APIError

router = APIRouter()


async def _entry(request: Request) -> dict[str, Any]:
    state = request.app.state.nemovl
    try:
        max_len = (await state.limits()).max_seq_len
    except APIError:
        max_len = None
    name = state.settings.model_name
    return {"id": name, "object": "model", "created": state.created, "owned_by": "nvidia", "root": name,
            "max_model_len": max_len}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [await _entry(request)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    if model_id != request.app.state.nemovl.settings.model_name:
        raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return await _entry(request)


@router.get("/v1/metadata")
async def metadata(request: Request) -> dict[str, Any]:
    state = request.app.state.nemovl
    s = state.settings
    p = await state.pool.model_parameters()
    lim = await state.limits()
    return {"model_id": p.get("model_id") or s.model_name, "served_model_name": s.model_name,
            "target": p.get("target"), "llm_precision": p.get("llm_precision"),
            "vision_precision": p.get("vision_precision"),
            "video_pruning_rate": float(p["video_pruning_rate"]) if p.get("video_pruning_rate") else 0.0,
            "limits": {"max_seq_len": lim.max_seq_len, "max_num_tiles": lim.max_num_tiles,
                       "max_images": lim.max_images, "max_video_frames": lim.max_video_frames},
            "triton_endpoints": len(s.triton_urls), "triton_model": s.triton_model}
