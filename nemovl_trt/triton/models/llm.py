"""Triton Python model `llm` (decoupled): streams generated token ids.

A thin execute loop over the engine runtime (`nemovl_trt.runtime`): the cpu target's reference batcher or
TensorRT-LLM on GPU targets, both behind `LlmEngine`. `execute` only enqueues; the engine's own thread
(or event loop) generates, so requests arriving during a decode join the running batch at the next step. A request whose client went away
(`request.is_cancelled()`) leaves the batch. Python backend 2.51 has no way to cancel a BLS stream, so
the `nemovl` model cancels through a control request: `control = {"op":"cancel","request_id":...}`.
`{"op":"stats"}` reports the active requests and counters. Model parameters `stream_interval` /
`stream_interval_min_batch` (written from the build's `serving:` section) go to the reference batcher (on GPU
targets TensorRT-LLM's own `stream_interval` comes from llm_api_options.yaml).

A request that fails after it was queued (the engine raised for it) ends with one final response whose
`finish_reason` is "error:<message>" (`nemovl` turns it into the client's error); a request refused at
submission gets a Triton error response (nothing was streamed yet).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from nemovl_trt.runtime import GenRequest, LlmEngine, load_engine
from nemovl_trt.runtime.engine_api import ERROR_PREFIX, STREAM_INTERVAL, STREAM_INTERVAL_MIN_BATCH
from nemovl_trt.triton.models import manifest as mf
from nemovl_trt.triton.models.common import (
    bytes_scalar,
    bytes_tensor,
    json_input,
    model_parameters,
    read_manifest,
    resolve_engines_dir,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(token_ids: list[int], finish_reason: str, index: int = 0, logprobs: dict | None = None,
              info: str = "") -> Any:
    """One response of the llm's decoupled stream (outputs of docs/interfaces.md "llm"): token_ids int64 [n],
    finish_reason, info (a control op's JSON answer), index int32 [1] (the choice), logprobs JSON."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("token_ids", np.asarray(token_ids, dtype=np.int64)),
        pb_utils.Tensor("finish_reason", bytes_tensor(finish_reason)),
        pb_utils.Tensor("info", bytes_tensor(info)),
        pb_utils.Tensor("index", np.array([index], dtype=np.int32)),
        pb_utils.Tensor("logprobs", bytes_tensor(json.dumps(logprobs) if logprobs else "")),
    ])


class TritonSink:
    """A request's `Sink`: each message becomes one response of the decoupled stream, sent from the calling
    thread — the engine's loop thread, which also polls `is_cancelled`, so the two IPC calls on one Triton
    request never overlap (overlapping them, from a separate sender thread, crashed the Python backend 2.51
    stub under load), and nothing is asked once the final response is out (the request is freed then).
    Fewer, larger responses under load come from the engine's stream interval (docs/triton.md)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.sender = request.get_response_sender()
        self._closed = False  # the final response went out (or is going out): nothing more is sent or asked
        self.gone = False  # a send failed: the requester went away

    def send(self, token_ids: list[int], finish_reason: str, index: int = 0, logprobs: dict | None = None,
             done: bool | None = None) -> None:
        if self._closed:
            return
        if finish_reason.startswith(ERROR_PREFIX):
            # In-band, as a normal final response whose finish_reason is "error:<message>": an error
            # *response* sent after token responses never reaches a BLS caller iterating the stream
            # (Python backend 2.51: the caller's iterator waits forever, issue 18), this one always does.
            token_ids, logprobs, done = [], None, True
        final = done if done is not None else bool(finish_reason)
        self._closed = final
        resp = _response(token_ids, finish_reason, index=index, logprobs=logprobs)
        try:
            if final:
                self.sender.send(resp, flags=FINAL)
            else:
                self.sender.send(resp)
        except Exception:  # noqa: BLE001 - the requester is gone: the next cancel poll drops it
            self.gone = True

    def is_cancelled(self) -> bool:
        if self.gone:
            return True
        if self._closed:
            return False
        try:
            return bool(self.request.is_cancelled())
        except Exception:  # noqa: BLE001 - a request that cannot be queried is gone
            return True


class TritonPythonModel:
    """The `llm` model."""

    def initialize(self, args: dict[str, Any]) -> None:
        engines = resolve_engines_dir(args)
        manifest = read_manifest(engines)
        params = model_parameters(args)
        limits = mf.limits(manifest)
        max_batch = int(params.get("max_batch_size") or limits.get("max_batch_size") or 1)
        kind = mf.llm_engine(manifest)
        torch_threads = int(params.get("torch_threads") or 0)
        if kind == "reference" and torch_threads > 0:
            import torch

            torch.set_num_threads(torch_threads)
        self.backend: LlmEngine = load_engine(kind, mf.llm_dir(engines, manifest), max_batch,
                                              llm_api_options=mf.llm_api_options(engines, manifest),
                                              dtype=params.get("dtype") or None,
                                              stream_interval=int(params.get("stream_interval") or STREAM_INTERVAL),
                                              stream_interval_min_batch=int(
                                                  params.get("stream_interval_min_batch") or STREAM_INTERVAL_MIN_BATCH))

    def _control(self, request: Any, op: dict[str, Any]) -> None:
        sender = request.get_response_sender()
        kind = op.get("op")
        if kind == "cancel":
            rid, index = str(op.get("request_id", "")), op.get("index")
            if index is None:
                result = {"cancelled": bool(self.backend.cancel(rid))}
            else:  # one choice of an n > 1 request (engines without choices have only choice 0)
                try:
                    result = {"cancelled": bool(self.backend.cancel(rid, int(index)))}
                except TypeError:
                    result = {"cancelled": bool(self.backend.cancel(rid))}
        elif kind == "stats":
            result = self.backend.snapshot()
        else:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"unknown control op {kind!r}; use 'cancel' or 'stats'.")),
                flags=FINAL)
            return
        sender.send(_response([], "", info=json.dumps(result)), flags=FINAL)

    def _submit(self, request: Any) -> None:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
        mm = pb_utils.get_input_tensor_by_name(request, "mm_embeddings")
        mm_arr = mm.as_numpy() if mm is not None else None  # each engine casts to its model dtype
        sampling = json_input(_np(pb_utils.get_input_tensor_by_name(request, "sampling")), {})
        if "max_new_tokens" not in sampling:
            raise ValueError("sampling.max_new_tokens is required.")
        rid_raw = bytes_scalar(_np(pb_utils.get_input_tensor_by_name(request, "request_id")))
        rid = rid_raw.decode() if rid_raw else uuid.uuid4().hex
        self.backend.submit(GenRequest(rid, [int(t) for t in ids], mm_arr, sampling, TritonSink(request)))

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            try:
                control = json_input(_np(pb_utils.get_input_tensor_by_name(request, "control")), None)
                if control is not None:
                    self._control(request, control)
                else:
                    self._submit(request)
            except Exception as e:  # noqa: BLE001 - one bad request never wedges the model
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"llm: {e}")),
                    flags=FINAL)
        return None

    def finalize(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def _np(tensor: Any) -> np.ndarray | None:
    return tensor.as_numpy() if tensor is not None else None
