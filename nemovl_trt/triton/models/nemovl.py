"""Triton Python model `nemovl` — the entry model (decoupled, BLS).

Per request (each on its own worker thread, so concurrent requests reach the `llm` together and are
batched there): `preprocessor` (BLS) → `vision_encoder` (BLS, in chunks of its max batch) when there are
tiles → EVS + frame layout rebuilt for video → `llm` (BLS, decoupled stream) → incremental detokenization,
stop strings, finish reason and token counts → one response per llm step (docs/interfaces.md).

Cancellation: the Python backend 2.51 cannot cancel a BLS stream, so when the client's request is
cancelled (or a stop string ends the answer early) this model sends the `llm` a control request
`{"op":"cancel","request_id":...}`; the llm drops the sequence from its batch at the next step.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from nemovl_trt.runtime.engine_api import ERROR_PREFIX
from nemovl_trt.triton.interface import (
    LLM_MODEL,
    NEMOVL_INPUTS,
    PREPROCESSOR_MODEL,
    VISION_MODEL,
)
from nemovl_trt.triton.models import manifest as mf
from nemovl_trt.triton.models.common import bytes_tensor, model_parameters, read_manifest, resolve_engines_dir
from nemovl_trt.triton.models.pipeline import EntryContext, apply_video_evs
from nemovl_trt.triton.streaming import TextStream

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# How often (s) a streaming request asks whether its client left: `is_cancelled()` is an IPC round trip to
# tritonserver, and asking once per llm response was ~7 % of the entry model's time at concurrency 8.
CANCEL_POLL_S = 0.05


class BLSError(Exception):
    """A downstream model answered with an error; `message` is passed to the client unchanged."""

    def __init__(self, message: str, code: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _raise_if_error(resp: Any, model: str) -> None:
    if resp.has_error():
        err = resp.error()
        msg = err.message()
        code = err.code() if hasattr(err, "code") else pb_utils.TritonError.INTERNAL
        if not msg.startswith("["):
            msg = f"{model}: {msg}"
        raise BLSError(msg, code)


def _llm_failure(message: str) -> BLSError:
    """The error a request the llm failed mid-stream ends with: INVALID_ARG for a `[code] ...` message (the
    user's input), else an internal error naming the llm."""
    if message.startswith("["):
        return BLSError(message, pb_utils.TritonError.INVALID_ARG)
    return BLSError(f"{LLM_MODEL}: {message}", pb_utils.TritonError.INTERNAL)


def _out(resp: Any, name: str) -> np.ndarray:
    t = pb_utils.get_output_tensor_by_name(resp, name)
    if t is None:
        raise RuntimeError(f"output {name} missing from the response")
    return t.as_numpy()


class TritonPythonModel:
    """The `nemovl` entry model."""

    def initialize(self, args: dict[str, Any]) -> None:
        engines = resolve_engines_dir(args)
        manifest = read_manifest(engines)
        params = model_parameters(args)
        self.ctx = EntryContext.load(engines, manifest)
        self.vision_max_batch = int(params.get("vision_max_batch_size") or 1)
        self.vision_input = params.get("vision_input") or "pixel_values"
        self.vision_output = params.get("vision_output") or "embeddings"
        in_dtype = params.get("vision_input_dtype") or "float32"
        if in_dtype not in ("float32", "float16"):
            raise RuntimeError(f"vision input dtype {in_dtype} cannot be sent from numpy; export the graph with "
                               f"a float32 or float16 input.")
        self.vision_input_dtype = np.dtype(in_dtype)
        workers = int(params.get("max_concurrency") or 64)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nemovl")
        self.target = mf.target(manifest)
        # EVS needs torch; import it in the background so the model is ready sooner.
        threading.Thread(target=importlib.import_module, args=("nemovl_trt.preprocess.evs",), daemon=True).start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

    def finalize(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- one request ----
    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            self._run(request, sender)
        except BLSError as e:
            self._send_error(sender, e.message, e.code)
        except Exception as e:  # noqa: BLE001 - never wedge: answer with an error, keep serving
            pb_utils.Logger.log_error(f"nemovl: {traceback.format_exc()}")
            self._send_error(sender, f"internal error in nemovl: {e}", pb_utils.TritonError.INTERNAL)

    @staticmethod
    def _send_error(sender: Any, message: str, code: Any) -> None:
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
        except Exception:  # noqa: BLE001 - the client is gone
            pass

    def _preprocess(self, request: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        inputs = []
        for spec in NEMOVL_INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, spec.name)
            if t is not None:
                inputs.append(pb_utils.Tensor(spec.name, t.as_numpy()))
        resp = pb_utils.InferenceRequest(model_name=PREPROCESSOR_MODEL, inputs=inputs,
                                         requested_output_names=["input_ids", "pixel_values", "info"]).exec()
        _raise_if_error(resp, PREPROCESSOR_MODEL)
        info = json.loads(_out(resp, "info").reshape(-1)[0].decode("utf-8"))
        return _out(resp, "input_ids").reshape(-1), _out(resp, "pixel_values"), info

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        """Tiles [N,3,S,S] → embeddings [N,P,D] through the vision_encoder model, in chunks."""
        chunks = []
        for start in range(0, pixels.shape[0], self.vision_max_batch):
            part = np.ascontiguousarray(pixels[start:start + self.vision_max_batch], dtype=self.vision_input_dtype)
            resp = pb_utils.InferenceRequest(model_name=VISION_MODEL, inputs=[pb_utils.Tensor(self.vision_input, part)],
                                             requested_output_names=[self.vision_output]).exec()
            _raise_if_error(resp, VISION_MODEL)
            chunks.append(_out(resp, self.vision_output).astype(np.float32, copy=False))
        return np.concatenate(chunks, axis=0)

    def _llm_cancel(self, rid: str, index: int | None = None) -> None:
        op: dict[str, Any] = {"op": "cancel", "request_id": rid}
        if index is not None:
            op["index"] = index
        req = pb_utils.InferenceRequest(
            model_name=LLM_MODEL, requested_output_names=["info"],
            inputs=[pb_utils.Tensor("input_ids", np.zeros((0,), dtype=np.int64)),
                    pb_utils.Tensor("control", bytes_tensor(json.dumps(op)))])
        for _ in req.exec(decoupled=True):
            pass

    def _logprobs(self, lps: str, ids: list[int], stream: TextStream, prompt_ids: Any) -> dict[str, Any] | None:
        """The llm's logprobs JSON → OpenAI-shaped entries with token text and bytes (eos tokens, which
        produce no text, are left out)."""
        if not lps:
            return None
        data = json.loads(lps)
        out: dict[str, Any] = {}

        def entry(tid: int, lp: float) -> dict[str, Any]:
            text, raw = self.ctx.token_piece(tid)
            return {"token_id": tid, "token": text, "bytes": raw, "logprob": lp}

        def full(tid: int, item: list) -> dict[str, Any]:
            return {**entry(tid, item[0]), "top_logprobs": [entry(int(a), b) for a, b in item[1]]}

        toks = data.get("tokens") or []
        out["content"] = [full(tid, item) for tid, item in zip(ids, toks, strict=False)
                          if tid not in stream.eos_ids]
        if data.get("prompt") is not None:
            out["prompt"] = [None if item is None else full(int(tid), item)
                             for tid, item in zip(prompt_ids.tolist(), data["prompt"], strict=False)]
            out["prompt"][0] = {**entry(int(prompt_ids[0]), None), "top_logprobs": []}
        return out

    def _run(self, request: Any, sender: Any) -> None:
        input_ids, pixels, info = self._preprocess(request)
        mm = None
        public_info = dict(info.get("public", {}))
        if pixels.shape[0] > 0:
            emb = self._encode(pixels)
            if info.get("video") is not None:
                input_ids, mm, pruned = apply_video_evs(self.ctx, input_ids, emb, info["video"])
                public_info["evs_pruned_tokens"] = pruned
            else:
                mm = emb.reshape(-1, emb.shape[-1])
        prompt_tokens = int(input_ids.shape[0])
        if request.is_cancelled():  # the client left during preprocessing / encoding: skip the llm
            self._send(sender, "", [], "cancelled", prompt_tokens, 0, None, final=True)
            return
        sampling = dict(info["sampling"])
        n = int(sampling.get("n") or 1)
        eos = () if sampling.get("ignore_eos") else self.ctx.eos_ids
        streams = {i: TextStream(decode=self.ctx.decode, stops=list(info.get("stop") or []), eos_ids=eos)
                   for i in range(n)}
        open_choices = set(range(n))
        rid = uuid.uuid4().hex
        llm_inputs = [pb_utils.Tensor("input_ids", input_ids.astype(np.int64)),
                      pb_utils.Tensor("sampling", bytes_tensor(json.dumps(sampling))),
                      pb_utils.Tensor("request_id", bytes_tensor(rid))]
        if mm is not None:
            llm_inputs.append(pb_utils.Tensor("mm_embeddings", np.ascontiguousarray(mm, dtype=np.float32)))
        llm_req = pb_utils.InferenceRequest(model_name=LLM_MODEL, inputs=llm_inputs,
                                            requested_output_names=["token_ids", "finish_reason", "index",
                                                                    "logprobs"])
        first = True
        finished = False  # a final response went to the client
        next_poll = 0.0  # when to ask again whether the client left (monotonic s)
        try:
            for resp in llm_req.exec(decoupled=True):
                if finished:
                    continue  # drain the llm stream after a cancel / stop string
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + CANCEL_POLL_S
                    if request.is_cancelled():
                        self._llm_cancel(rid)
                        finished = True
                        self._send(sender, "", [], "cancelled", prompt_tokens, streams[0].completion_tokens,
                                   None, final=True)
                        continue
                if resp.has_error():
                    _raise_if_error(resp, LLM_MODEL)
                if pb_utils.get_output_tensor_by_name(resp, "token_ids") is None:
                    continue  # the empty final-flag response of a decoupled stream
                ids = _out(resp, "token_ids").reshape(-1).tolist()
                engine_finish = _out(resp, "finish_reason").reshape(-1)[0].decode("utf-8")
                if engine_finish.startswith(ERROR_PREFIX):  # the engine failed this request (llm.py: in-band)
                    finished = True  # the llm already dropped it: no cancel
                    raise _llm_failure(engine_finish[len(ERROR_PREFIX):])
                index = int(_out(resp, "index").reshape(-1)[0])
                stream = streams.get(index)
                if stream is None or index not in open_choices:
                    continue  # a choice already ended by a stop string
                raw_lps = _out(resp, "logprobs").reshape(-1)[0].decode("utf-8")
                delta = stream.push(ids, engine_finish)
                ids = delta.token_ids  # without those after a stop string
                if delta.finish_reason:
                    open_choices.discard(index)
                    if not engine_finish:  # a stop string ended this choice before the engine did
                        self._llm_cancel(rid, index if n > 1 else None)
                final = not open_choices
                self._send(sender, delta.text, ids, delta.finish_reason, prompt_tokens, delta.completion_tokens,
                           public_info if first else None, index=index,
                           logprobs=self._logprobs(raw_lps, ids, stream, input_ids), final=final)
                first = False
                if final:
                    finished = True
        except Exception:
            if not finished:  # keep the llm from decoding for nobody
                try:
                    self._llm_cancel(rid)
                except Exception:  # noqa: BLE001 - best effort; the original error is what matters
                    pass
            raise
        if not finished:
            raise RuntimeError("the llm stream ended without a finish reason")

    @staticmethod
    def _send(sender: Any, text: str, ids: list[int], finish: str, prompt_tokens: int, completion: int,
              info: dict[str, Any] | None, index: int = 0, logprobs: dict[str, Any] | None = None,
              final: bool = False) -> None:
        resp = pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text", bytes_tensor(text)),
            pb_utils.Tensor("token_ids", np.asarray(ids, dtype=np.int64)),
            pb_utils.Tensor("finish_reason", bytes_tensor(finish)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion], dtype=np.int32)),
            pb_utils.Tensor("info", bytes_tensor(json.dumps(info) if info is not None else "")),
            pb_utils.Tensor("index", np.array([index], dtype=np.int32)),
            pb_utils.Tensor("logprobs", bytes_tensor(json.dumps(logprobs) if logprobs else "")),
        ])
        try:
            sender.send(resp, flags=FINAL if final else 0)
        except Exception:  # noqa: BLE001 - the client is gone; the llm stream is drained by the caller
            pass
