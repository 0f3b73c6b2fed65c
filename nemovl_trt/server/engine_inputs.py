"""A validated request → the inputs of the `nemovl` entry model (`TritonRequest`): media URLs fetched into
bytes, messages (or a raw prompt), tools, and the `params` JSON that carries every sampling parameter and
the structured-output spec (validated in schemas.py / sampling_schema.py / response_format.py)."""

from __future__ import annotations

import asyncio

from nemovl_trt.server.completions_schema import CompletionRequest
from nemovl_trt.server.media import load_media
from nemovl_trt.server.schemas import ChatRequest
from nemovl_trt.server.state import ServerState
from nemovl_trt.server.triton_client import TritonRequest


async def chat_inputs(state: ServerState, req: ChatRequest) -> TritonRequest:
    """Chat: messages with media referenced by index, the media bytes, tools and params."""
    refs = req.images + ([req.video] if req.video else [])
    datas = await asyncio.gather(*(load_media(r.url, state.media_policy, r.kind, r.param, state.http) for r in refs))
    images = list(datas[:len(req.images)])
    video = datas[-1] if req.video else None
    return TritonRequest(messages=req.messages, images=images, video=video, tools=req.tools, params=dict(req.params))


async def completion_inputs(state: ServerState, req: CompletionRequest) -> TritonRequest:
    """Completions: the raw prompt (text or token ids) instead of the chat template; no media, no tools."""
    return TritonRequest(messages=[], prompt=req.prompt, params=dict(req.params))
