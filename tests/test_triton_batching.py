"""Continuous batching and cancellation in the `llm` model, through the real tritonserver."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures_triton import llm_control, stream_nemovl

pytestmark = pytest.mark.integration

N_REQUESTS = 8
MAX_TOKENS = 24


def _request(i: int) -> tuple[list[dict], dict]:
    return ([{"role": "user", "content": f"Request number {i}: list the items on receipt {i * 7}."}],
            {"max_tokens": MAX_TOKENS, "ignore_eos": True, "seed": i, "temperature": 0.7})


def test_concurrent_requests_are_batched_and_faster_than_sequential(triton_server) -> None:
    url = triton_server.grpc_url
    stream_nemovl(url, *_request(99))  # warm-up
    before = llm_control(url, {"op": "stats"})
    t0 = time.monotonic()
    sequential = [stream_nemovl(url, *_request(i)) for i in range(N_REQUESTS)]
    t_seq = time.monotonic() - t0
    t0 = time.monotonic()
    with ThreadPoolExecutor(N_REQUESTS) as pool:
        concurrent = list(pool.map(lambda i: stream_nemovl(url, *_request(i)), range(N_REQUESTS)))
    t_conc = time.monotonic() - t0
    after = llm_control(url, {"op": "stats"})
    for s, c in zip(sequential, concurrent, strict=True):
        assert s.error is None and c.error is None
        assert s.completion_tokens == c.completion_tokens == MAX_TOKENS
        assert s.finish_reason == c.finish_reason == "length"
        # per-request RNG: the batch composition does not change the sampled tokens
        assert c.token_ids == s.token_ids
    assert after["max_batch_seen"] >= 2
    assert after["completed"] - before["completed"] == 2 * N_REQUESTS
    ratio = t_seq / t_conc
    latency = sorted(r.seconds for r in sequential)[N_REQUESTS // 2]
    sys.stderr.write(f"\n[batching] {N_REQUESTS}×{MAX_TOKENS} tokens: sequential {t_seq:.2f} s, concurrent "
                     f"{t_conc:.2f} s, ratio {ratio:.2f}×; p50 request latency {latency:.3f} s, max batch "
                     f"{after['max_batch_seen']}\n")
    assert t_conc < t_seq


def test_cancel_mid_stream_frees_the_engine(triton_server) -> None:
    url = triton_server.grpc_url
    before = llm_control(url, {"op": "stats"})
    res = stream_nemovl(url, [{"role": "user", "content": "Write a very long story."}],
                        {"max_tokens": 4000, "ignore_eos": True}, cancel_after=3)
    assert res.error is None and len(res.responses) == 3 and res.finish_reason == ""
    deadline = time.monotonic() + 20
    stats = llm_control(url, {"op": "stats"})
    while (stats["active"] or stats["cancelled"] == before["cancelled"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = llm_control(url, {"op": "stats"})
    assert stats["active"] == [] and stats["queued"] == []
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["completed"] == before["completed"]  # it did not run to its 4000 tokens
    t0 = time.monotonic()
    nxt = stream_nemovl(url, [{"role": "user", "content": "Short answer please."}], {"max_tokens": 8,
                                                                                     "ignore_eos": True})
    assert nxt.error is None and nxt.completion_tokens == 8
    assert time.monotonic() - t0 < 10


def test_llm_control_rejects_unknown_op(triton_server) -> None:
    with pytest.raises(RuntimeError, match="unknown control op"):
        llm_control(triton_server.grpc_url, {"op": "explode"})
