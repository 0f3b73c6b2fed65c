"""Fault tests of `nemovl serve --repo` (one server for the module, 127.0.0.1 only, every loop bounded):

- kill -9 of each Python-backend stub and of tritonserver itself during a stream: the stream ends with an
  SSE error event and [DONE] (never a hang), the API answers 503 `model_not_ready` with Retry-After meanwhile,
  tritonserver is back on the same ports within RECOVERY_LIMIT_S, the old processes are gone (no zombie, no
  orphaned stub), their shared memory removed, and /metrics counts the restart;
- `--request-timeout`: 504 / an error event, the engine's work cancelled;
- overload: 64 concurrent requests against --max-concurrent 8 --max-queue 16 give 429s with Retry-After and
  no 5xx, then full service.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults_support import (
    MODEL,
    ServeProcess,
    Stream,
    chat_body,
    own_repository,
    wait_until,
)

pytestmark = pytest.mark.integration

RECOVERY_LIMIT_S = 90.0  # issue: "recovers within a stated time"; measured 2-4 s on an idle 2-core VM
REQUEST_TIMEOUT_S = 5.0
LONG = {"max_tokens": 8000, "ignore_eos": True}


@pytest.fixture(scope="module")
def serve(cpu_engines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    base = tmp_path_factory.mktemp("faults")
    repo = own_repository(cpu_engines_dir, base / "repo")
    with ServeProcess(repo, base / "cwd",
                      ["--max-concurrent", "8", "--max-queue", "16", "--request-timeout", str(REQUEST_TIMEOUT_S),
                       "--log-level", "warning"]).running() as sp:
        yield sp


def _restarts(metrics: dict[str, float]) -> dict[str, float]:
    return {r: metrics[f'nemovl_triton_restarts_total{{reason="{r}"}}'] for r in ("stub_died", "server_exited",
                                                                               "unhealthy")}


def _argv0(pid: int) -> bytes | None:
    """argv[0] of `pid`, None when no such process; a zombie has an empty command line (b"")."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return None


def _llm_active(serve: ServeProcess) -> list[str]:
    from tests.test_server_openai import _llm_active as active

    port = next(a.split("=")[1] for a in Path(f"/proc/{serve.triton_pid()}/cmdline").read_bytes().decode()
                .split("\0") if a.startswith("--grpc-port="))
    return active(f"127.0.0.1:{port}")


@pytest.mark.parametrize("target", ["llm", "nemovl", "preprocessor", "vision_encoder", "tritonserver"])
def test_kill_during_stream_recovers(serve: ServeProcess, target: str) -> None:
    assert wait_until(serve.ready, RECOVERY_LIMIT_S)
    old_ts = serve.triton_pid()
    old_stubs = serve.stubs()
    old_shm = serve.shm_regions()
    assert set(old_stubs) == {"llm", "nemovl", "preprocessor", "vision_encoder"} and len(old_shm) == 4
    old = {pid: _argv0(pid) for pid in [old_ts, *old_stubs.values()]}
    restarts0 = _restarts(serve.metrics())

    stream = Stream(serve.url, chat_body("Tell a long story.", **LONG))
    assert stream.started.wait(60) and stream.status == 200 and len(stream.events) >= 3, stream.error
    t0 = time.monotonic()
    os.kill(old_ts if target == "tritonserver" else old_stubs[target], signal.SIGKILL)

    assert stream.join(30), "the stream hung after the kill"
    assert stream.done and stream.error is None
    err = stream.error_event()
    # model_not_ready both when the supervisor's restart cuts the stream and when a dead stub is reported first
    # by the `nemovl` stub ("Stub process 'llm_0_0' is not healthy": the model is unavailable, issue 18)
    assert err is not None and err["code"] == "model_not_ready", err

    retry_afters = set()
    client = httpx.Client(timeout=10)
    while time.monotonic() - t0 < RECOVERY_LIMIT_S:
        r = client.get(serve.url + "/v1/health/ready")
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        retry_afters.add(r.headers.get("retry-after"))
        time.sleep(0.1)
    recovered_s = time.monotonic() - t0
    assert recovered_s < RECOVERY_LIMIT_S, f"not ready again within {RECOVERY_LIMIT_S} s"
    assert None not in retry_afters and all(int(v) >= 1 for v in retry_afters)

    r = client.post(serve.url + "/v1/chat/completions", json=chat_body(max_tokens=4))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

    new_ts = serve.triton_pid()
    assert new_ts is not None and new_ts != old_ts
    assert set(serve.stubs()) == set(old_stubs)
    # nothing of the old server is left: no process (not even a zombie), no shared memory
    assert wait_until(lambda: all(_argv0(pid) != argv0 for pid, argv0 in old.items()), 30), \
        {pid: _argv0(pid) for pid in old}
    assert [r for r in old_shm if r.exists()] == []
    m = serve.metrics()
    # one restart; a killed stub is seen as "stub_died", or as "server_exited" when tritonserver aborts first
    # (2.51 sometimes does when a stub with requests in flight dies)
    now = _restarts(m)
    assert sum(now.values()) == sum(restarts0.values()) + 1, (restarts0, now)
    if target == "tritonserver":
        assert now["server_exited"] == restarts0["server_exited"] + 1
    assert m["nemovl_triton_up"] == 1.0 and 0 < m["nemovl_triton_last_recovery_seconds"] < RECOVERY_LIMIT_S
    print(f"\n[faults] kill -9 {target}: ready again after {recovered_s:.1f} s")


def test_request_timeout_stream_ends_with_timeout_event_and_frees_the_engine(serve: ServeProcess) -> None:
    assert wait_until(serve.ready, RECOVERY_LIMIT_S)
    t0 = time.monotonic()
    stream = Stream(serve.url, chat_body("Tell a long story.", **LONG))
    assert stream.join(REQUEST_TIMEOUT_S + 30)
    took = time.monotonic() - t0
    err = stream.error_event()
    assert stream.done and err is not None and err["code"] == "timeout" and err["type"] == "timeout_error"
    assert took >= REQUEST_TIMEOUT_S - 0.5
    assert wait_until(lambda: _llm_active(serve) == [], 15), "the engine kept generating after the timeout"


def test_request_timeout_non_stream_is_504(serve: ServeProcess) -> None:
    assert wait_until(serve.ready, RECOVERY_LIMIT_S)
    r = httpx.post(serve.url + "/v1/chat/completions", json=chat_body("Tell a long story.", **LONG),
                   timeout=REQUEST_TIMEOUT_S + 30)
    assert r.status_code == 504
    e = r.json()["error"]
    assert (e["code"], e["type"]) == ("timeout", "timeout_error") and r.headers["x-request-id"]
    assert serve.metrics()["nemovl_request_timeouts_total"] >= 1


def test_request_timeout_non_stream_frees_the_engine(serve: ServeProcess) -> None:
    assert wait_until(serve.ready, RECOVERY_LIMIT_S)
    r = httpx.post(serve.url + "/v1/chat/completions", json=chat_body("Tell a long story.", **LONG),
                   timeout=REQUEST_TIMEOUT_S + 30)
    assert r.status_code == 504
    assert wait_until(lambda: _llm_active(serve) == [], 15)


def test_burst_of_64_with_max_queue_16_is_429_not_collapse(serve: ServeProcess) -> None:
    assert wait_until(serve.ready, RECOVERY_LIMIT_S)
    body = chat_body("Count to five.", max_tokens=8, ignore_eos=True)

    async def burst(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post(serve.url + "/v1/chat/completions", json=body) for _ in range(n)))

    rs = asyncio.run(burst(64))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 8 + 16
    for r in rs:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 8
    # then full service: a burst that fits the queue is served completely
    again = asyncio.run(burst(16))
    assert [r.status_code for r in again] == [200] * 16
    print(f"\n[faults] burst 64 / queue 16: {codes.count(200)} served, {codes.count(429)} x 429")


def test_api_stays_json_for_every_route_after_the_faults(serve: ServeProcess) -> None:
    assert wait_until(serve.ready, RECOVERY_LIMIT_S)
    r = httpx.get(serve.url + "/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    r = httpx.get(serve.url + "/openapi.json")
    assert json.loads(r.text)["paths"]["/v1/chat/completions"]["post"]["operationId"] == "createChatCompletion"
