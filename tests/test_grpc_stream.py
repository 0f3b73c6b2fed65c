"""The frontend's own gRPC stream client (nemovl_trt/server/grpc_stream.py) and TritonPool on top of it.

- encoding: requests are byte-for-byte what tritonclient builds for the same inputs; BYTES elements use
  Triton's 4-byte little-endian length prefix;
- against a real tritonserver (the session's `triton_server`): the same greedy request gives exactly the
  tokens, text and counts that tritonclient's own stream gives; Triton's "[code] message" errors become a
  400 with that code; an unknown model is 503 `model_not_ready`; the stream deadline is a 504; closing the
  response iterator early cancels the request in the engine; the control calls (ready, index, config)
  answer what tritonclient answers.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from tritonclient.grpc import _utils as tc_utils
from tritonclient.utils import serialize_byte_tensor

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.grpc_stream import TritonGrpc, first_bytes_element, infer_request, serialize_bytes
from nemovl_trt.server.replicas import HealthPolicy
from nemovl_trt.server.triton_client import (
    TritonPool,
    TritonRequest,
    build_request,
    channel_args,
)
from tests.fixtures_triton import llm_control, stream_nemovl
from tests.triton_inputs import build_inputs

MSGS = [{"role": "user", "content": "Tell a long story about a cat."}]
NO_HEALTH_CHECKS = HealthPolicy(interval_s=60)
LONG = 4000  # tokens: seconds of generation on the cpu target, within the tiny model's context


# ------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("values", [[b"x"], [b""], [b"ab", b"", "é🙂".encode(), bytes(range(256)) * 3]])
def test_bytes_encoding_equals_tritonclients(values: list[bytes]) -> None:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    assert serialize_bytes(values) == serialize_byte_tensor(arr).item()
    assert first_bytes_element(serialize_bytes(values)) == values[0]


def test_first_element_of_a_short_or_empty_buffer_is_empty() -> None:
    assert first_bytes_element(b"") == b"" and first_bytes_element(b"\x05\x00") == b""
    assert first_bytes_element(b"\x05\x00\x00\x00ab") == b"ab"  # truncated element: what is there


def test_request_equals_the_one_tritonclient_builds() -> None:
    req = TritonRequest(messages=[{"role": "user", "content": [{"type": "image", "index": 0}, "Grüße"]}],
                        images=[b"\x89PNG1", b"\xff\xd8JPEG2"], tools=[{"type": "function"}],
                        params={"max_tokens": 3, "seed": 1}, prompt=[1, 2, 3])
    ours = build_request(req, "nemovl", "req-7")
    theirs = tc_utils._get_inference_request(
        model_name="nemovl", inputs=build_inputs(req), model_version="", request_id="req-7", outputs=None,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    assert [i.name for i in ours.inputs] == ["messages", "images", "tools", "params", "prompt"]
    assert [list(i.shape) for i in ours.inputs] == [[1], [2], [1], [1], [1]]
    assert json.loads(first_bytes_element(ours.raw_input_contents[3])) == {"max_tokens": 3, "seed": 1}


def test_empty_request_has_no_inputs() -> None:
    req = infer_request("m", "", [])
    assert (req.model_name, req.id, len(req.inputs), len(req.raw_input_contents)) == ("m", "", 0, 0)


# ------------------------------------------------------------------------------------------- real Triton
def _pool(url: str, timeout_s: float = 120.0, model: str = "nemovl") -> TritonPool:
    return TritonPool([url], model, timeout_s, health=NO_HEALTH_CHECKS)


def _run(coro, limit_s: float = 20.0):
    """asyncio.run with a watchdog: a hung call fails the test, printing where every task waits."""
    async def go():
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait([task], timeout=limit_s)
        if not done:
            for t in asyncio.all_tasks():
                t.print_stack()
            task.cancel()
            raise AssertionError(f"the stream did not finish within {limit_s:g} s")
        return task.result()

    return asyncio.run(go())


def _engine_active(url: str) -> list:
    return llm_control(url, {"op": "stats"})["active"]


def _wait_idle(url: str, pool: TritonPool, limit_s: float = 30.0) -> None:
    """Poll until the engine and the pool have nothing in flight (or `limit_s` passed); the caller asserts."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s and (pool.in_flight or _engine_active(url)):
        time.sleep(0.1)


@pytest.mark.integration
def test_stream_gives_exactly_what_tritonclient_gives(triton_server) -> None:
    params = {"max_tokens": 8, "temperature": 0.0, "seed": 0, "ignore_eos": True}
    ref = stream_nemovl(triton_server.grpc_url, MSGS, params)
    assert ref.error is None

    async def go() -> list:
        pool = _pool(triton_server.grpc_url)
        try:
            return [c async for c in pool.generate(TritonRequest(messages=MSGS, params=params), "same-1")]
        finally:
            await pool.close()

    chunks = _run(go())
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == ref.token_ids and len(ids) == 8
    assert "".join(c.text for c in chunks) == ref.text
    last = chunks[-1]
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == \
        ("length", 8, ref.prompt_tokens)
    assert ref.prompt_tokens > 0 and [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[0].info is not None and chunks[0].info == json.loads(ref.responses[0]["info"])


@pytest.mark.integration
def test_n_choices_end_when_every_choice_finished(triton_server) -> None:
    params = {"max_tokens": 3, "temperature": 0.0, "n": 2, "ignore_eos": True}

    async def go() -> list:
        pool = _pool(triton_server.grpc_url)
        try:
            return [c async for c in pool.generate(TritonRequest(messages=MSGS, params=params), "n-2")]
        finally:
            await pool.close()

    chunks = _run(go())
    for i in (0, 1):
        mine = [c for c in chunks if c.index == i]
        assert sum(len(c.token_ids) for c in mine) == 3 and mine[-1].finish_reason == "length"
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1]


@pytest.mark.integration
def test_a_bad_parameter_is_a_400_with_tritons_code(triton_server) -> None:
    async def go() -> None:
        pool = _pool(triton_server.grpc_url)
        try:
            with pytest.raises(APIError) as e:
                async for _ in pool.generate(TritonRequest(messages=MSGS, params={"max_tokens": 0}), "bad-1"):
                    pass
            assert (e.value.status, e.value.code) == (400, "invalid_parameter")
            assert "max_tokens" in e.value.message
            rep = pool.replicas.replicas[0]
            assert (rep.failures, rep.up, pool.in_flight) == (0, True, 0)  # the request's fault, not the replica's
        finally:
            await pool.close()

    _run(go())


@pytest.mark.integration
def test_an_unknown_model_is_503_model_not_ready(triton_server) -> None:
    async def go() -> None:
        pool = _pool(triton_server.grpc_url, model="no_such_model")
        try:
            with pytest.raises(APIError) as e:
                async for _ in pool.generate(TritonRequest(messages=MSGS, params={"max_tokens": 1}), "nope"):
                    pass
            assert (e.value.status, e.value.code) == (503, "model_not_ready")
            rep = pool.replicas.replicas[0]
            assert (rep.failures, rep.up) == (1, False)
            # and a health check agrees: Triton is up but the model is not in its repository index
            assert await pool.ready(force=True) is False
        finally:
            await pool.close()

    _run(go())


@pytest.mark.integration
def test_the_stream_deadline_is_a_504_and_frees_the_engine(triton_server) -> None:
    url = triton_server.grpc_url
    pool_box: list[TritonPool] = []

    async def go() -> APIError:
        pool = _pool(url, timeout_s=0.5)
        pool_box.append(pool)
        req = TritonRequest(messages=MSGS, params={"max_tokens": LONG, "ignore_eos": True})
        try:
            with pytest.raises(APIError) as e:
                async for _ in pool.generate(req, "slow-1"):
                    pass
            return e.value
        finally:
            await pool.close()

    err = _run(go())
    assert (err.status, err.code) == (504, "timeout") and "0.5 s" in err.message
    _wait_idle(url, pool_box[0])
    assert _engine_active(url) == [] and pool_box[0].in_flight == 0


@pytest.mark.integration
def test_closing_the_iterator_early_cancels_the_engine_request(triton_server) -> None:
    url = triton_server.grpc_url
    pool = _pool(url)

    async def go() -> int:
        gen = pool.generate(TritonRequest(messages=MSGS, params={"max_tokens": LONG, "ignore_eos": True}),
                            "early-1")
        got = 0
        async for c in gen:
            got += len(c.token_ids)
            if got >= 3:
                break
        await gen.aclose()
        return got

    loop = asyncio.new_event_loop()
    try:
        got = loop.run_until_complete(go())
        assert got >= 3 and pool.in_flight == 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and _engine_active(url):
            time.sleep(0.1)
        assert _engine_active(url) == []
        # the replica stays UP and serves the next request on the same channel
        nxt = loop.run_until_complete(_collect(pool, {"max_tokens": 2, "ignore_eos": True}))
        assert sum(len(c.token_ids) for c in nxt) == 2 and pool.replicas.replicas[0].up
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


async def _collect(pool: TritonPool, params: dict) -> list:
    return [c async for c in pool.generate(TritonRequest(messages=MSGS, params=params), "next")]


@pytest.mark.integration
def test_control_calls_answer_what_tritonclient_answers(triton_server) -> None:
    import tritonclient.grpc as grpcclient

    ref = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        ref_index = {m["name"]: m.get("state", "") for m in ref.get_model_repository_index(as_json=True)["models"]}
        ref_params = {k: v.get("string_value", "") for k, v in
                      ref.get_model_config("nemovl", as_json=True)["config"].get("parameters", {}).items()}
    finally:
        ref.close()

    async def go() -> tuple:
        c = TritonGrpc(triton_server.grpc_url, channel_args())
        try:
            return (await c.server_ready(5.0), dict(await c.repository_index(5.0)),
                    await c.model_parameters("nemovl", 5.0))
        finally:
            await c.close()

    ready, index, params = _run(go())
    assert ready is True
    assert index == ref_index and index["nemovl"] == "READY"
    assert params == ref_params and params  # the entry model's config has parameters (docs/interfaces.md)

    async def pool_view() -> tuple:
        pool = _pool(triton_server.grpc_url)
        try:
            return await pool.ready(force=True), await pool.model_parameters()
        finally:
            await pool.close()

    assert _run(pool_view()) == (True, ref_params)

