"""parse_result reads a streamed `nemovl` response (a ModelInferResponse protobuf) in one pass; it must give
exactly what tritonclient's own InferResult.as_numpy decoding gives, for every output type the interface has,
from raw contents (what Triton's gRPC frontend sends) and from typed contents alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from nemovl_trt.server.triton_client import OUTPUTS, parse_result


def _response(values: dict[str, tuple[str, np.ndarray]]) -> service_pb2.ModelInferResponse:
    """A ModelInferResponse as Triton's gRPC frontend sends it (raw_output_contents, one per output)."""
    resp = service_pb2.ModelInferResponse(model_name="nemovl", id="r1")
    for name, (dtype, arr) in values.items():
        out = resp.outputs.add(name=name, datatype=dtype, shape=list(arr.shape))
        assert out.name == name
        raw = serialize_byte_tensor(arr).item() if dtype == "BYTES" else arr.tobytes()
        resp.raw_output_contents.append(raw)
    return resp


_TYPED = {"BYTES": "bytes_contents", "INT32": "int_contents", "INT64": "int64_contents"}


def _typed_response(values: dict[str, tuple[str, np.ndarray]]) -> service_pb2.ModelInferResponse:
    """The same response with typed `contents` per output instead of raw contents."""
    resp = service_pb2.ModelInferResponse(model_name="nemovl", id="r1")
    for name, (dtype, arr) in values.items():
        out = resp.outputs.add(name=name, datatype=dtype, shape=list(arr.shape))
        getattr(out.contents, _TYPED[dtype]).extend(arr.tolist())
    return resp


def _bytes(s: str) -> tuple[str, np.ndarray]:
    return "BYTES", np.array([s.encode()], dtype=object)


def _generic(resp: service_pb2.ModelInferResponse) -> dict:
    """The reference decoding: tritonclient's InferResult.as_numpy for each output."""
    result = InferResult(resp)
    def first(name: str):
        v = result.as_numpy(name).reshape(-1)[0]
        return v.decode() if isinstance(v, bytes) else int(v)
    return {"text": first("text"), "token_ids": [int(x) for x in result.as_numpy("token_ids").reshape(-1)],
            "finish_reason": first("finish_reason"), "prompt_tokens": first("prompt_tokens"),
            "completion_tokens": first("completion_tokens"), "index": first("index")}


LP = {"content": [{"token_id": 7, "token": "é", "logprob": -0.25, "top_logprobs": []}]}
FULL = {"text": _bytes("Grüße, 世界 🙂"), "token_ids": ("INT64", np.array([5, 131072, 2**40])),
        "finish_reason": _bytes("length"), "prompt_tokens": ("INT32", np.array([1234], np.int32)),
        "completion_tokens": ("INT32", np.array([3], np.int32)),
        "info": _bytes(json.dumps({"warnings": ["w"], "tiles": [13]})),
        "index": ("INT32", np.array([2], np.int32)), "logprobs": _bytes(json.dumps(LP))}


@pytest.mark.parametrize("build", [_response, _typed_response], ids=["raw", "typed"])
def test_one_pass_parse_equals_as_numpy_on_every_output(build) -> None:
    lp = LP
    # the reference is tritonclient's decoding of the raw form (its as_numpy reads no typed int contents)
    chunk = parse_result(build(FULL))
    ref = _generic(_response(FULL))
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


def test_negative_and_wide_integers_keep_their_sign() -> None:
    # INT32 scalars are read with int.from_bytes(signed=True): -1 must not come back as 4294967295
    result = _response({**FULL, "prompt_tokens": ("INT32", np.array([-1], np.int32)),
                        "index": ("INT64", np.array([-(2**40)], np.int64)),
                        "token_ids": ("INT32", np.array([7, -3], np.int32))})
    chunk = parse_result(result)
    assert (chunk.prompt_tokens, chunk.index, chunk.token_ids) == (-1, -(2**40), [7, -3])
