"""gRPC streaming client for the `nemovl` entry model (tensor interface: docs/interfaces.md, "triton").

Several Triton endpoints (replicas, nemovl_trt/server/replicas.py) may be given; each request goes to the UP
replica with the fewest requests in flight and is re-sent once to another one when its replica fails before
the first chunk went out; a failure after that is `ReplicaLost`, which a caller that has shown nothing yet
(a non-streamed request, nemovl_trt/server/service.py) re-runs from scratch elsewhere (docs/replicas.md). Closing the response iterator early (client disconnect) cancels
the gRPC call, which makes Triton cancel the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.grpc_stream import TritonGrpc, first_bytes_element, infer_request
from nemovl_trt.server.replicas import HealthPolicy, Replica, ReplicaSet

log = logging.getLogger("nemovl.pool")

OUTPUTS = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "info", "index", "logprobs")
_CODE_RE = re.compile(r"^\s*\[([a-z0-9_]+)\]\s*(.*)$", re.S)
# Codes that mean the request itself was wrong; everything the preprocessor raises is one of these or
# another lower_snake code in brackets — all of them map to 400.
NOT_READY_CODES = {grpc.StatusCode.UNAVAILABLE}
CONFIG_TIMEOUT_S = 2.0  # reading the model config (once per process): a loaded 2-core host is slow


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
    """A Triton error message → APIError: "[code] text" is a 400 with that code; a model that is missing,
    loading or crashed is 503 `model_not_ready`; anything else 500."""
    m = _CODE_RE.match(message or "")
    if m:
        return APIError(400, m.group(2).strip() or m.group(1), code=m.group(1))
    low = (message or "").lower()
    # "is not healthy": a model's Python-backend stub crashed ("Stub process 'llm_0_0' is not healthy"); the
    # supervisor restarts that server, so it is the model being unavailable, not a failure of this request.
    if "unknown model" in low or "not ready" in low or "is not found" in low or "is not healthy" in low:
        return APIError(503, "The model is not ready.", code="model_not_ready")
    return APIError(500, "The inference server failed on this request.", code="internal_error")


def request_tensors(req: TritonRequest) -> list[tuple[str, list[bytes]]]:
    """TritonRequest → the BYTES inputs (name, elements), named and shaped as in docs/interfaces.md."""
    tensors = [("messages", [json.dumps(req.messages, ensure_ascii=False).encode()])]
    if req.images:
        tensors.append(("images", list(req.images)))
    if req.video is not None:
        tensors.append(("video", [req.video]))
    if req.tools:
        tensors.append(("tools", [json.dumps(req.tools, ensure_ascii=False).encode()]))
    tensors.append(("params", [json.dumps(req.params).encode()]))
    if req.prompt is not None:
        tensors.append(("prompt", [json.dumps(req.prompt, ensure_ascii=False).encode()]))
    return tensors


def build_request(req: TritonRequest, model: str, request_id: str) -> service_pb2.ModelInferRequest:
    """TritonRequest → the `ModelInferRequest` protobuf the pool streams (raw BYTES contents)."""
    return infer_request(model, request_id, request_tensors(req))


_INT_DTYPES = {"INT32": "<i4", "INT64": "<i8"}
_INT_FIELDS = {"INT32": "int_contents", "INT64": "int64_contents"}


def _outputs(resp: service_pb2.ModelInferResponse) -> dict[str, Any]:
    """name → first element (BYTES: str, INT32/INT64: int) or, for token_ids, the list of ints, read in ONE
    pass over the response protobuf (no InferResult / per-output numpy arrays: eight outputs per streamed
    token are on the frontend's hot path, docs/benchmarks.md)."""
    raw = resp.raw_output_contents
    out: dict[str, Any] = {}
    for i, o in enumerate(resp.outputs):
        dtype = o.datatype
        if i >= len(raw):  # typed `contents` instead of raw ones (never sent so by Triton's gRPC frontend)
            c = o.contents
            if dtype == "BYTES":
                out[o.name] = c.bytes_contents[0].decode("utf-8", "replace") if c.bytes_contents else ""
            elif dtype in _INT_FIELDS:
                vals = [int(x) for x in getattr(c, _INT_FIELDS[dtype])]
                out[o.name] = vals if o.name == "token_ids" else (vals[0] if vals else 0)
            continue
        buf = raw[i]
        if dtype == "BYTES":
            out[o.name] = first_bytes_element(buf).decode("utf-8", "replace")
        elif dtype in _INT_DTYPES:
            if o.name == "token_ids":
                out[o.name] = np.frombuffer(buf, dtype=_INT_DTYPES[dtype]).tolist()
            else:  # a scalar: int.from_bytes is ~10x cheaper than an array for one value
                width = 4 if dtype == "INT32" else 8
                out[o.name] = int.from_bytes(buf[:width], "little", signed=True) if len(buf) >= width else 0
    return out


def _json_dict(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _first_str(v: Any) -> str:
    if isinstance(v, list):  # the generic path gives lists
        v = v[0] if v else ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return "" if v is None else str(v)


def _first_int(v: Any) -> int:
    if isinstance(v, list):
        v = v[0] if v else 0
    return int(v) if v is not None else 0


def parse_result(resp: service_pb2.ModelInferResponse) -> TritonChunk:
    """One streamed `ModelInferResponse` (ModelStreamInferResponse.infer_response) → TritonChunk."""
    t = _outputs(resp)
    ids = t.get("token_ids")
    return TritonChunk(text=_first_str(t.get("text")),
                       token_ids=list(ids) if isinstance(ids, list) else [],
                       finish_reason=_first_str(t.get("finish_reason")),
                       prompt_tokens=_first_int(t.get("prompt_tokens")),
                       completion_tokens=_first_int(t.get("completion_tokens")),
                       info=_json_dict(_first_str(t.get("info"))), index=_first_int(t.get("index")),
                       logprobs=_json_dict(_first_str(t.get("logprobs"))))


# gRPC reconnect backoff: the library default grows to 120 s, so a replica restarted on the same port could
# stay unreachable from this channel for minutes; capped so that it is seen again within about a second.
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 250, "grpc.min_reconnect_backoff_ms": 250,
                        "grpc.max_reconnect_backoff_ms": 1000}


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's default channel options (message size, keepalive) plus the capped reconnect backoff."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    ka = KeepAliveOptions()
    return [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", ka.keepalive_time_ms), ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
            *RECONNECT_BACKOFF_MS.items()]


def connect(url: str) -> TritonGrpc:
    """The gRPC client (one aio channel) of one replica."""
    return TritonGrpc(url, channel_args())


class ReplicaFailure(Exception):
    """A request failed because of its replica (transport error, model not ready), not because of itself:
    `error` is what the client gets when it cannot be retried."""

    def __init__(self, error: APIError, why: str) -> None:
        super().__init__(why)
        self.error = error
        self.why = why


class ReplicaLost(APIError):
    """APIError 503 `model_not_ready` of a request whose replica failed (transport error, model not ready)
    after chunks of it had been yielded, so `generate` did not re-send it. `replica` is that replica's index:
    a caller that has shown nothing to its client yet (a non-streamed request) may run the whole request
    again elsewhere (`TritonPool.retry_lost`, then `generate(..., exclude={replica})`)."""

    def __init__(self, error: APIError, replica: int) -> None:
        super().__init__(error.status, error.message, code=error.code, param=error.param, headers=error.headers)
        self.replica = replica


def _code(e: grpc.RpcError) -> grpc.StatusCode | None:
    return e.code() if hasattr(e, "code") else None


def _details(e: grpc.RpcError) -> str:
    return (e.details() or "") if hasattr(e, "details") else str(e)


def _unreachable() -> APIError:
    return APIError(503, "The inference server is not reachable.", code="model_not_ready")


class TritonPool:
    """Talks to one or more Triton servers (replicas) serving the same repository; see
    nemovl_trt/server/replicas.py for the routing and health rules."""

    def __init__(self, urls: list[str], model: str, timeout_s: float, ready_cache_s: float = 1.0,
                 health: HealthPolicy | None = None) -> None:
        self.urls = list(urls)
        self.model = model
        self.timeout_s = timeout_s
        # `ready_cache_s` (how stale a readiness answer may be) is the UP health-check period unless a policy
        # is given.
        self.replicas = ReplicaSet(self.urls, self._endpoint_ready, connect,
                                   health or HealthPolicy(interval_s=ready_cache_s))
        self._params: dict[str, str] | None = None

    @property
    def in_flight(self) -> int:
        return self.replicas.in_flight

    async def close(self) -> None:
        await self.replicas.close()

    async def _endpoint_ready(self, rep: Replica) -> bool:
        """True: ready; False: a definite "not ready" (or a refused connection); TimeoutError: no answer."""
        timeout = self.replicas.policy.probe_timeout_s
        try:
            if not await rep.client.server_ready(timeout):
                return False
            models = await rep.client.repository_index(timeout)
            if not any(name == self.model for name, _ in models):
                return False
            return all(state == "READY" for _, state in models if state)
        except grpc.RpcError as e:
            if _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(_details(e)) from e
            return False
        except OSError:
            return False

    async def ready(self, force: bool = False) -> bool:
        """True when at least one replica has Triton and every model in its repository READY."""
        return await self.replicas.ready(force)

    async def model_parameters(self) -> dict[str, str]:
        """`nemovl` model-config parameters (string values), cached once read (UP replicas asked first)."""
        if self._params is not None:
            return self._params
        last: Exception | None = None
        for rep in sorted(self.replicas.started(), key=lambda r: not r.up):
            try:
                self._params = await rep.client.model_parameters(self.model, CONFIG_TIMEOUT_S)
            except (grpc.RpcError, OSError) as e:
                last = e
                continue
            return self._params
        raise APIError(503, "The inference server is not ready.", code="model_not_ready") from last

    def retry_lost(self, lost: ReplicaLost, request_id: str) -> bool:
        """Whether a request lost mid-generation on replica `lost.replica` may be run again from scratch by
        its caller (it showed nothing to its client yet): True when retries are allowed
        (`HealthPolicy.retries` > 0) and another replica is UP; the re-run then counts as a retry of the
        failed replica (`nemovl_replica_retries_total`), as a re-send before the first chunk does."""
        rs = self.replicas
        if rs.policy.retries < 1 or not any(r.up and r.index != lost.replica for r in rs.replicas):
            return False
        failed = rs.replicas[lost.replica]
        failed.retries += 1
        log.warning("request %s: replica %s failed mid-generation; nothing was sent to the client yet, so it "
                    "runs again from the start on another replica", request_id, failed.url)
        return True

    async def generate(self, req: TritonRequest, request_id: str,
                       exclude: frozenset[int] = frozenset()) -> AsyncIterator[TritonChunk]:
        """Stream `nemovl` responses until every choice has a finish_reason (one "cancelled" ends them all).

        Routed to the least-loaded UP replica (not one in `exclude`: then only an UP one, else 503). When
        that replica fails (transport error, model not ready) before any chunk was yielded, the request is
        sent again to another UP replica (at most `HealthPolicy.retries` times); once a chunk went out it
        never is (the caller would see tokens twice), and the failure is raised as `ReplicaLost` (an APIError
        503 `model_not_ready`). Raises APIError on a Triton error. Closing the iterator before the end cancels
        the gRPC call (and with it the engine request)."""
        request = build_request(req, self.model, request_id)
        rs = self.replicas
        rep = rs.pick(exclude=set(exclude), up_only=True) if exclude else rs.pick()
        if rep is None:  # every replica but the excluded one(s) went down meanwhile
            raise _unreachable()
        tried: set[int] = set(exclude)
        retries_left = rs.policy.retries
        while True:
            tried.add(rep.index)
            yielded = False
            try:
                async with contextlib.aclosing(self._attempt(rep, req, request)) as chunks:
                    async for chunk in chunks:
                        yielded = True
                        yield chunk
                return
            except ReplicaFailure as f:
                nxt = rs.pick(exclude=tried, up_only=True) if not yielded and retries_left > 0 else None
                if nxt is None:
                    log.warning("request %s: replica %s failed (%s); not retried: %s", request_id, rep.url, f.why,
                                "a chunk had gone out" if yielded else "no other replica is up" if retries_left
                                else "retries used up")
                    raise (ReplicaLost(f.error, rep.index) if yielded else f.error) from f
                retries_left -= 1
                rep.retries += 1
                log.warning("request %s: replica %s failed before its first token (%s); retrying on replica %s",
                            request_id, rep.url, f.why, nxt.url)
                rep = nxt

    async def _attempt(self, rep: Replica, req: TritonRequest,
                       request: service_pb2.ModelInferRequest) -> AsyncIterator[TritonChunk]:
        """One try of `generate` on `rep`; a failure of the replica raises ReplicaFailure (and marks it down).

        The request stays half-open (no `done_writing`) until the last response came, as with tritonclient's
        stream: the call ends by our cancel or by reading to the end."""
        open_choices = set(range(req.n))

        def failed(error: APIError, why: str) -> ReplicaFailure:
            rep.failures += 1
            self.replicas.mark_down(rep, why)
            return ReplicaFailure(error, why)

        rep.in_flight += 1
        rep.requests += 1
        call = None
        finished = False
        try:
            try:
                call = rep.client.stream(self.timeout_s)
                with contextlib.suppress(asyncio.InvalidStateError):  # ended already: read() raises its status
                    await call.write(request)
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    if msg.error_message:
                        finished = True
                        api = map_triton_error(msg.error_message)
                        if api.code == "model_not_ready":
                            raise failed(api, f"model not ready: {msg.error_message[:200]}")
                        raise api
                    chunk = parse_result(msg.infer_response)
                    if chunk.finish_reason:
                        open_choices.discard(chunk.index)
                        if not open_choices or chunk.finish_reason == "cancelled":
                            finished = True
                    if not rep.up:
                        self.replicas.mark_up(rep)  # tried while every replica was down, and it answers
                    yield chunk
                    if finished:
                        return
            except grpc.RpcError as e:
                code = _code(e)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise APIError(504, f"The generation took longer than this server's limit of "
                                        f"{self.timeout_s:g} s.", code="timeout") from e
                if code in NOT_READY_CODES:
                    raise failed(_unreachable(), f"gRPC {code.name}: {_details(e)}") from e
                if code == grpc.StatusCode.CANCELLED:
                    raise
                raise map_triton_error(_details(e)) from e
            raise APIError(500, "The inference server closed the stream without a final response.",
                           code="internal_error")
        finally:
            rep.in_flight -= 1
            if call is not None:
                if finished:  # half-close, so that Triton ends the stream (its final status is not awaited)
                    with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                        await call.done_writing()
                else:
                    call.cancel()
