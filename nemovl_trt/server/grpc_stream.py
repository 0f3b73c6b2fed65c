"""A lean gRPC client of one Triton server: the frontend's per-request hot path without tritonclient's
object layers.

tritonclient's aio `stream_infer` (tritonclient 2.73.0) builds an `InferInput` (a numpy object array, then
its serialization) per input, wraps the request iterator in an async generator that validates a dict, and
wraps every streamed response in an `InferResult`. A profile put that at ≈ 0.7 of the ≈ 12.5 ms of frontend
CPU per request (the rest is socket writes, gRPC's poller thread and epoll, docs/benchmarks.md): what this
module saves is small, and it keeps the hot path free of those layers. Here a request is one `ModelInferRequest` protobuf built directly
(BYTES tensors as Triton's raw encoding: per element a 4-byte little-endian length, then the bytes), written
on a `ModelStreamInfer` call with `call.write()` (no request-iterator task), and responses are read with
`call.read()` as `ModelStreamInferResponse` protobufs, decoded by the caller from `raw_output_contents`.

The stubs are Triton's generated ones shipped in tritonclient (`tritonclient.grpc.service_pb2`,
`service_pb2_grpc.GRPCInferenceServiceStub`); the control calls (server ready, repository index, model
config) use the same channel, so a replica is one HTTP/2 connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

BYTES = "BYTES"
_LEN_BYTES = 4  # Triton's BYTES element prefix: uint32 little-endian length


def serialize_bytes(values: Sequence[bytes]) -> bytes:
    """BYTES tensor elements → Triton's raw encoding (each: 4-byte little-endian length, then the bytes)."""
    if len(values) == 1:  # the common case: one JSON document
        v = values[0]
        return len(v).to_bytes(_LEN_BYTES, "little") + v
    return b"".join(len(v).to_bytes(_LEN_BYTES, "little") + v for v in values)


def first_bytes_element(raw: bytes) -> bytes:
    """The first element of a raw BYTES tensor (b"" when it has none or is truncated)."""
    if len(raw) < _LEN_BYTES:
        return b""
    n = int.from_bytes(raw[:_LEN_BYTES], "little")
    return raw[_LEN_BYTES:_LEN_BYTES + n]


def infer_request(model: str, request_id: str,
                  tensors: Sequence[tuple[str, Sequence[bytes]]]) -> service_pb2.ModelInferRequest:
    """A `ModelInferRequest` for `model` with 1-D BYTES inputs `(name, elements)`; no `outputs` listed, so
    Triton returns every output of the model (what tritonclient sends when `outputs=None`)."""
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, values in tensors:
        req.inputs.add(name=name, datatype=BYTES, shape=[len(values)])
        req.raw_input_contents.append(serialize_bytes(values))
    return req


class TritonGrpc:
    """One Triton endpoint (`url` = HOST:PORT): an insecure `grpc.aio` channel with `options` (gRPC channel
    args) and Triton's stub. Create inside the running event loop; `close()` when done."""

    def __init__(self, url: str, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.url = url
        self._channel = grpc.aio.insecure_channel(url, options=list(options))
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def stream(self, timeout_s: float | None) -> grpc.aio.StreamStreamCall:
        """Open a `ModelStreamInfer` call (deadline `timeout_s` for the whole stream, else none). Send with
        `await call.write(request)`, read with `await call.read()` (→ ModelStreamInferResponse, or
        `grpc.aio.EOF`), `call.cancel()` to abort it (Triton then cancels its requests). Errors are
        `grpc.aio.AioRpcError` from write/read."""
        return self._stub.ModelStreamInfer(timeout=timeout_s)

    async def server_ready(self, timeout_s: float) -> bool:
        """Triton's ServerReady."""
        return (await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)).ready

    async def repository_index(self, timeout_s: float) -> list[tuple[str, str]]:
        """(name, state) of every model in the repository ("" state: not loaded / not reported)."""
        resp = await self._stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=timeout_s)
        return [(m.name, m.state) for m in resp.models]

    async def model_parameters(self, model: str, timeout_s: float) -> dict[str, str]:
        """`parameters` of `model`'s config, as their string values."""
        resp = await self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=timeout_s)
        return {k: v.string_value for k, v in resp.config.parameters.items()}

    async def close(self) -> None:
        await self._channel.close()
