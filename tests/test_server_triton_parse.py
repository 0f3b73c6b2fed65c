"""parse_result reads a streamed `nemovl` response in one pass over the protobuf; it must give exactly what
tritonclient's own InferResult.as_numpy decoding gives, for every output type the interface has."""

from __future__ import annotations

import json

import numpy as np
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from nemovl_trt.server.triton_client import OUTPUTS, parse_result


def _response(values: dict[str, tuple[str, np.ndarray]]) -> InferResult:
    """A ModelInferResponse as Triton's gRPC frontend sends it (raw_output_contents, one per output)."""
    resp = service_pb2.ModelInferResponse(model_name="nemovl", id="r1")
    for name, (dtype, arr) in values.items():
        out = resp.outputs.add(name=name, datatype=dtype, shape=list(arr.shape))
        assert out.name == name
        raw = serialize_byte_tensor(arr).item() if dtype == "BYTES" else arr.tobytes()
        resp.raw_output_contents.append(raw)
    return InferResult(resp)


def _bytes(s: str) -> tuple[str, np.ndarray]:
    return "BYTES", np.array([s.encode()], dtype=object)


def _generic(result: InferResult) -> dict:
    """The reference decoding: tritonclient's as_numpy for each output."""
    def first(name: str):
        v = result.as_numpy(name).reshape(-1)[0]
        return v.decode() if isinstance(v, bytes) else int(v)
    return {"text": first("text"), "token_ids": [int(x) for x in result.as_numpy("token_ids").reshape(-1)],
            "finish_reason": first("finish_reason"), "prompt_tokens": first("prompt_tokens"),
            "completion_tokens": first("completion_tokens"), "index": first("index")}


def test_one_pass_parse_equals_as_numpy_on_every_output() -> None:
    lp = {"content": [{"token_id": 7, "token": "é", "logprob": -0.25, "top_logprobs": []}]}
    result = _response({"text": _bytes("Grüße, 世界 🙂"), "token_ids": ("INT64", np.array([5, 131072, 2**40])),
                        "finish_reason": _bytes("length"), "prompt_tokens": ("INT32", np.array([1234], np.int32)),
                        "completion_tokens": ("INT32", np.array([3], np.int32)),
                        "info": _bytes(json.dumps({"warnings": ["w"], "tiles": [13]})),
                        "index": ("INT32", np.array([2], np.int32)), "logprobs": _bytes(json.dumps(lp))})
    chunk = parse_result(result)
    ref = _generic(result)
    assert (chunk.text, chunk.token_ids, chunk.finish_reason) == (ref["text"], ref["token_ids"], ref["finish_reason"])
    assert (chunk.prompt_tokens, chunk.completion_tokens, chunk.index) == (1234, 3, 2)
    assert chunk.token_ids == [5, 131072, 2**40]
    assert chunk.info == {"warnings": ["w"], "tiles": [13]} and chunk.logprobs == lp


def test_empty_outputs_and_bad_json_give_the_defaults() -> None:
    result = _response({"text": _bytes(""), "token_ids": ("INT64", np.array([], np.int64)),
                        "finish_reason": _bytes(""), "prompt_tokens": ("INT32", np.array([0], np.int32)),
                        "completion_tokens": ("INT32", np.array([0], np.int32)), "info": _bytes("{not json"),
                        "index": ("INT32", np.array([0], np.int32)), "logprobs": _bytes("[1, 2]")})
    chunk = parse_result(result)
    assert (chunk.text, chunk.token_ids, chunk.finish_reason, chunk.info, chunk.logprobs) == ("", [], "", None, None)


def test_every_interface_output_is_read() -> None:
    # parse_result fills one field per output name the frontend requests
    assert set(OUTPUTS) == {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "info",
                            "index", "logprobs"}
