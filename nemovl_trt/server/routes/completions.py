"""POST /v1/completions (raw prompt: text or token ids; no chat template).

The life cycle is `service.run_generation`'s (auth, body, model, readiness, validation, one admission slot,
first responses awaited so errors before any output are HTTP errors, the re-run of a non-streamed request
whose replica failed mid-generation), with one engine request per prompt (each of n, or best_of, choices):
`run_generation` merges their streams re-indexed prompt-major (prompt i's choice j is i * m + j, m the
engine choices per prompt), so the same response shaping (`completion_output`) serves one prompt and several.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from nemovl_trt.server.completion_output import complete_text, stream_text
from nemovl_trt.server.completions_schema import CompletionRequest, parse_completion_request
from nemovl_trt.server.engine_inputs import completion_inputs
from nemovl_trt.server.sampling_schema import Limits
from nemovl_trt.server.service import Generation, observed, run_generation
from nemovl_trt.server.state import ServerState
from nemovl_trt.server.triton_client import TritonRequest

router = APIRouter()
ID_PREFIX = "cmpl-"


def _parse(body: Any, lim: Any) -> CompletionRequest:
    return parse_completion_request(body, Limits(lim.max_seq_len))


async def _respond(req: CompletionRequest, g: Generation) -> Response:
    return await (stream_text(req, g) if req.stream else complete_text(req, g))


async def _engine_requests(state: ServerState, req: CompletionRequest) -> list[TritonRequest]:
    """One engine request per prompt, in prompt order."""
    return [await completion_inputs(state, req.for_prompt(i)) for i in range(len(req.prompts))]


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = request.app.state.nemovl
    t0 = time.perf_counter()
    return await observed(state, t0, run_generation(
        state, request, t0, parse=_parse, to_triton=lambda r: _engine_requests(state, r), id_prefix=ID_PREFIX,
        respond=_respond))
