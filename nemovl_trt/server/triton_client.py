"""gRPC streaming client for the `nemovl` entry model (tensor interface: docs/interfaces.md, "triton").

Several Triton endpoints may be given; each request goes to the ready endpoint with the fewest requests
in flight. Closing the response iterator early (client disconnect) cancels the gRPC call, which makes
Triton cancel the request in the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from nemovl_trt.server.errors import APIError

OUTPUTS = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "info", "index", "logprobs")
_CODE_RE = re.compile(r"^\s*\[([a-z0-9_]+)\]\s*(.*)$", re.S)
# Codes that mean the request itself was wrong; everything the preprocessor raises is one of these or
# another lower_snake code in brackets — all of them map to 400.
NOT_READY_CODES = {grpc.StatusCode.UNAVAILABLE}


@dataclass
class TritonChunk:
    """One streamed response of `nemovl`."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "" while streaming; then "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int  # of this choice
    info: dict[str, Any] | None  # first response only
    index: int = 0  # the choice
    logprobs: dict[str, Any] | None = None  # {"content": [...], "prompt"?: [...]} when asked


@dataclass
class TritonRequest:
    """The inputs of one `nemovl` call (BYTES tensors are JSON / raw media bytes)."""

    messages: list[dict[str, Any]]
    images: list[bytes] = field(default_factory=list)
    video: bytes | None = None
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    prompt: str | list[int] | None = None  # a raw prompt (/v1/completions) instead of the chat template

    @property
    def n(self) -> int:
        return int(self.params.get("n") or 1)


def map_triton_error(message: str) -> APIError:
    """A Triton error message → APIError: "[code] text" is a 400 with that code; else 500."""
    m = _CODE_RE.match(message or "")
    if m:
        return APIError(400, m.group(2).strip() or m.group(1), code=m.group(1))
    low = (message or "").lower()
    if "unknown model" in low or "not ready" in low or "is not found" in low:
        return APIError(503, "The model is not ready.", code="model_not_ready")
    return APIError(500, "The inference server failed on this request.", code="internal_error")


def _bytes_input(name: str, values: list[bytes]) -> grpcclient.InferInput:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    inp = grpcclient.InferInput(name, [len(values)], "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def build_inputs(req: TritonRequest) -> list[grpcclient.InferInput]:
    """TritonRequest → InferInputs named and shaped as in docs/interfaces.md."""
    inputs = [_bytes_input("messages", [json.dumps(req.messages, ensure_ascii=False).encode()])]
    if req.images:
        inputs.append(_bytes_input("images", list(req.images)))
    if req.video is not None:
        inputs.append(_bytes_input("video", [req.video]))
    if req.tools:
        inputs.append(_bytes_input("tools", [json.dumps(req.tools, ensure_ascii=False).encode()]))
    inputs.append(_bytes_input("params", [json.dumps(req.params).encode()]))
    if req.prompt is not None:
        inputs.append(_bytes_input("prompt", [json.dumps(req.prompt, ensure_ascii=False).encode()]))
    return inputs


def _scalar_str(result: Any, name: str) -> str:
    arr = result.as_numpy(name)
    if arr is None or arr.size == 0:
        return ""
    v = arr.reshape(-1)[0]
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _scalar_int(result: Any, name: str) -> int:
    arr = result.as_numpy(name)
    return int(arr.reshape(-1)[0]) if arr is not None and arr.size else 0


def parse_result(result: Any) -> TritonChunk:
    """One InferResult → TritonChunk."""
    ids = result.as_numpy("token_ids")
    info_text = _scalar_str(result, "info")
    try:
        info = json.loads(info_text) if info_text else None
    except json.JSONDecodeError:
        info = None
    lp_text = _scalar_str(result, "logprobs")
    try:
        logprobs = json.loads(lp_text) if lp_text else None
    except json.JSONDecodeError:
        logprobs = None
    return TritonChunk(text=_scalar_str(result, "text"),
                       token_ids=[int(x) for x in ids.reshape(-1)] if ids is not None else [],
                       finish_reason=_scalar_str(result, "finish_reason"),
                       prompt_tokens=_scalar_int(result, "prompt_tokens"),
                       completion_tokens=_scalar_int(result, "completion_tokens"),
                       info=info if isinstance(info, dict) else None, index=_scalar_int(result, "index"),
                       logprobs=logprobs if isinstance(logprobs, dict) else None)


@dataclass
class Endpoint:
    """One Triton gRPC endpoint and its bookkeeping."""

    url: str
    client: grpcclient.InferenceServerClient
    in_flight: int = 0
    ready: bool = True


class TritonPool:
    """Talks to one or more Triton servers serving the same repository."""

    def __init__(self, urls: list[str], model: str, timeout_s: float, ready_cache_s: float) -> None:
        if not urls:
            raise ValueError("At least one Triton gRPC endpoint is needed.")
        self.urls = list(urls)
        self.model = model
        self.timeout_s = timeout_s
        self.ready_cache_s = ready_cache_s
        self._endpoints: list[Endpoint] = []
        self._rr = itertools.count()
        self._ready_at = 0.0
        self._ready = False
        self._params: dict[str, str] | None = None

    def _eps(self) -> list[Endpoint]:
        if not self._endpoints:  # created lazily inside the running event loop
            self._endpoints = [Endpoint(u, grpcclient.InferenceServerClient(u)) for u in self.urls]
        return self._endpoints

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self._endpoints)

    async def close(self) -> None:
        for e in self._endpoints:
            await e.client.close()
        self._endpoints = []

    async def _endpoint_ready(self, ep: Endpoint) -> bool:
        try:
            if not await ep.client.is_server_ready(client_timeout=2.0):
                return False
            index = await ep.client.get_model_repository_index(as_json=True, client_timeout=2.0)
            models = index.get("models", [])
            if not any(m.get("name") == self.model for m in models):
                return False
            return all(m.get("state") == "READY" for m in models if m.get("state") is not None)
        except (InferenceServerException, grpc.RpcError, OSError):
            return False

    async def ready(self, force: bool = False) -> bool:
        """True when at least one endpoint has Triton and every model in its repository READY."""
        now = time.monotonic()
        if not force and now - self._ready_at < self.ready_cache_s:
            return self._ready
        eps = self._eps()
        states = await asyncio.gather(*(self._endpoint_ready(e) for e in eps))
        for e, s in zip(eps, states, strict=True):
            e.ready = s
        self._ready, self._ready_at = any(states), time.monotonic()
        return self._ready

    async def model_parameters(self) -> dict[str, str]:
        """`nemovl` model-config parameters (string values), cached once read."""
        if self._params is not None:
            return self._params
        last: Exception | None = None
        for ep in self._eps():
            try:
                cfg = await ep.client.get_model_config(self.model, as_json=True, client_timeout=2.0)
            except (InferenceServerException, grpc.RpcError, OSError) as e:
                last = e
                continue
            params = cfg.get("config", cfg).get("parameters", {}) or {}
            self._params = {k: v.get("string_value", "") for k, v in params.items()}
            return self._params
        raise APIError(503, "The inference server is not ready.", code="model_not_ready") from last

    def _pick(self) -> Endpoint:
        eps = self._eps()
        cands = [e for e in eps if e.ready] or eps
        low = min(e.in_flight for e in cands)
        best = [e for e in cands if e.in_flight == low]
        return best[next(self._rr) % len(best)]

    async def generate(self, req: TritonRequest, request_id: str) -> AsyncIterator[TritonChunk]:
        """Stream `nemovl` responses until every choice has a finish_reason (one "cancelled" ends them all).
        Raises APIError on a Triton error. Closing the iterator before the end cancels the gRPC call (and with
        it the engine request)."""
        ep = self._pick()
        open_choices = set(range(req.n))
        done = asyncio.Event()
        inputs = build_inputs(req)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": inputs, "request_id": request_id}
            await done.wait()  # keep the stream open until the final response

        ep.in_flight += 1
        call = None
        finished = False
        try:
            try:
                call = ep.client.stream_infer(requests(), stream_timeout=self.timeout_s)
            except InferenceServerException as e:
                raise APIError(503, "The inference server is not reachable.", code="model_not_ready") from e
            try:
                async for result, error in call:
                    if error is not None:
                        finished = True
                        raise map_triton_error(error.message())
                    chunk = parse_result(result)
                    if chunk.finish_reason:
                        open_choices.discard(chunk.index)
                        if not open_choices or chunk.finish_reason == "cancelled":
                            finished = True
                    yield chunk
                    if finished:
                        return
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise APIError(504, f"The generation took longer than this server's limit of "
                                        f"{self.timeout_s:g} s.", code="timeout") from e
                if code in NOT_READY_CODES:
                    ep.ready = False
                    self._ready_at = 0.0
                    raise APIError(503, "The inference server is not reachable.", code="model_not_ready") from e
                if code == grpc.StatusCode.CANCELLED:
                    raise
                raise map_triton_error(e.details() if hasattr(e, "details") else str(e)) from e
            raise APIError(500, "The inference server closed the stream without a final response.",
                           code="internal_error")
        finally:
            done.set()
            ep.in_flight -= 1
            if call is not None and not finished:
                call.cancel()
