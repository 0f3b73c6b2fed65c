"""POST /v1/completions (raw prompt: text or token ids; no chat template)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from nemovl_trt.server.completion_output import complete_text, stream_text
from nemovl_trt.server.completions_schema import CompletionRequest, parse_completion_request
from nemovl_trt.server.engine_inputs import completion_inputs
from nemovl_trt.server.sampling_schema import Limits
from nemovl_trt.server.service import Generation, observed, run_generation

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = request.app.state.nemovl
    t0 = time.perf_counter()

    async def respond(req: CompletionRequest, g: Generation) -> Response:
        return await (stream_text(req, g) if req.stream else complete_text(req, g))

    return await observed(state, t0, run_generation(
        state, request, t0, parse=lambda body, lim: parse_completion_request(body, Limits(lim.max_seq_len)),
        to_triton=lambda r: completion_inputs(state, r), id_prefix="cmpl-", respond=respond))
