"""POST /v1/chat/completions."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from nemovl_trt.server.chat_output import complete_chat, stream_chat
from nemovl_trt.server.engine_inputs import chat_inputs
from nemovl_trt.server.schemas import ChatRequest, parse_chat_request
from nemovl_trt.server.service import Generation, observed, run_generation

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = request.app.state.nemovl
    t0 = time.perf_counter()

    async def respond(req: ChatRequest, g: Generation) -> Response:
        return await (stream_chat(req, g) if req.stream else complete_chat(req, g))

    return await observed(state, t0, run_generation(
        state, request, t0, parse=parse_chat_request, to_triton=lambda r: chat_inputs(state, r),
        id_prefix="chatcmpl-", respond=respond))
