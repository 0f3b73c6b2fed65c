"""The ASGI app without a Triton server: error envelopes, auth, body cap, 503 while Triton is down,
admission control (429), metrics. Driven in-process through httpx.ASGITransport."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from nemovl_trt.server.app import Admission, create_app
from nemovl_trt.server.errors import APIError
from nemovl_trt.server.metrics import Metrics
from nemovl_trt.server.settings import DEFAULT_MODEL_NAME, Settings
from nemovl_trt.server.triton_client import TritonRequest, build_request, map_triton_error
from tests.fixtures_server import free_port

CHAT = "/v1/chat/completions"
OK_BODY = {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def run(settings: Settings, calls: list[tuple[str, str, Any, dict[str, str]]]) -> list[httpx.Response]:
    """Send `(method, path, json_or_bytes, headers)` requests to a fresh app, in order."""
    app = create_app(settings)

    async def go() -> list[httpx.Response]:
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            for method, path, payload, headers in calls:
                kw: dict[str, Any] = {"headers": headers}
                if isinstance(payload, bytes):
                    kw["content"] = payload
                elif payload is not None:
                    kw["json"] = payload
                out.append(await c.request(method, path, **kw))
        return out

    return asyncio.run(go())


def down(**kw: Any) -> Settings:
    """Settings pointing at a closed port: Triton is 'not ready'."""
    return Settings(triton_urls=[f"127.0.0.1:{free_port()}"], **kw)


def envelope(r: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert "detail" not in r.text
    return body["error"]


def test_triton_down_gives_503_and_bad_requests_still_400() -> None:
    rs = run(down(), [
        ("GET", "/v1/health/live", None, {}),
        ("GET", "/v1/health/ready", None, {}),
        ("GET", "/health", None, {}),
        ("POST", CHAT, OK_BODY, {}),
        ("POST", CHAT, {**OK_BODY, "temperature": 9}, {}),
        ("POST", CHAT, {**OK_BODY, "model": "gpt-4o"}, {}),
        ("GET", "/v1/metadata", None, {}),
        ("GET", "/v1/models", None, {}),
        ("GET", f"/v1/models/{DEFAULT_MODEL_NAME}", None, {}),
        ("GET", "/v1/models/other", None, {}),
        ("GET", "/metrics", None, {}),
    ])
    assert rs[0].status_code == 200 and rs[0].json()["status"] == "live"
    assert envelope(rs[1], 503, "model_not_ready")["type"] == "service_unavailable_error"
    envelope(rs[2], 503, "model_not_ready")
    envelope(rs[3], 503, "model_not_ready")
    assert envelope(rs[4], 400, "invalid_parameter")["param"] == "temperature"
    assert envelope(rs[5], 404, "model_not_found")["param"] == "model"
    envelope(rs[6], 503, "model_not_ready")
    models = rs[7].json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [DEFAULT_MODEL_NAME]
    assert set(models["data"][0]) >= {"id", "object", "created", "owned_by", "max_model_len"}
    assert rs[8].json()["id"] == DEFAULT_MODEL_NAME
    envelope(rs[9], 404, "model_not_found")
    metrics = rs[10].text
    assert 'nemovl_requests_total{status="503"} 1.0' in metrics
    assert 'nemovl_requests_total{status="400"} 1.0' in metrics
    assert 'nemovl_requests_total{status="404"} 1.0' in metrics


def test_routes_methods_json_and_body_cap() -> None:
    rs = run(down(max_body_bytes=2000), [
        ("GET", "/v1/nothing", None, {}),
        ("GET", CHAT, None, {}),
        ("DELETE", "/v1/models", None, {}),
        ("POST", CHAT, b"{not json", {"content-type": "application/json"}),
        ("POST", CHAT, json.dumps({**OK_BODY, "pad": "x" * 3000}).encode(), {"content-type": "application/json"}),
        ("POST", CHAT, b"[1, 2]", {"content-type": "application/json"}),
    ])
    envelope(rs[0], 404, "not_found")
    envelope(rs[1], 405, "method_not_allowed")
    envelope(rs[2], 405, "method_not_allowed")
    envelope(rs[3], 400, "invalid_json")
    assert envelope(rs[4], 413, "content_too_large")["type"] == "invalid_request_error"
    envelope(rs[5], 400, "invalid_json")


def test_body_cap_without_content_length() -> None:
    """A chunked upload (no Content-Length) is cut off at the cap too."""
    app = create_app(down(max_body_bytes=1000))

    async def chunks():
        yield b'{"model": "' + DEFAULT_MODEL_NAME.encode() + b'", "pad": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(CHAT, content=chunks(), headers={"content-type": "application/json"})

    envelope(asyncio.run(go()), 413, "content_too_large")


def test_api_key() -> None:
    rs = run(down(api_key="s3cret"), [
        ("POST", CHAT, OK_BODY, {}),
        ("POST", CHAT, OK_BODY, {"Authorization": "Bearer wrong"}),
        ("POST", CHAT, OK_BODY, {"Authorization": "Bearer s3cret"}),
        ("GET", "/v1/health/live", None, {}),
    ])
    assert envelope(rs[0], 401, "invalid_api_key")["type"] == "authentication_error"
    envelope(rs[1], 401, "invalid_api_key")
    envelope(rs[2], 503, "model_not_ready")  # past auth
    assert rs[3].status_code == 200


def test_admission_queue_bound() -> None:
    async def go() -> None:
        adm = Admission(max_concurrent=1, max_queued=1, retry_after_s=2, metrics=Metrics())
        await adm.acquire()  # running
        waiter = asyncio.ensure_future(adm.acquire())  # queued
        await asyncio.sleep(0)
        assert adm.waiting == 1
        with pytest.raises(APIError) as e:
            await adm.acquire()
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "2"}
        assert e.value.to_dict()["error"]["type"] == "rate_limit_error"
        adm.release()
        await waiter
        assert adm.active == 1 and adm.waiting == 0
        adm.release()
        await adm.acquire()  # free again
        adm.release()

    asyncio.run(go())


@pytest.mark.parametrize(("message", "status", "code"), [
    ("[invalid_image] The image 1 could not be decoded.", 400, "invalid_image"),
    ("[context_length_exceeded] The prompt is 5000 tokens.", 400, "context_length_exceeded"),
    ("[invalid_video_sampling] fps 60 is above the video's 30 fps.", 400, "invalid_video_sampling"),
    ("Request for unknown model: 'nemovl' is not found", 503, "model_not_ready"),
    ("Segmentation fault in stub", 500, "internal_error"),
    # issue 18: a crashed / restarting model is the model being unavailable, not a failed request
    ("Stub process 'llm_0_0' is not healthy.", 503, "model_not_ready"),
    ("Failed to process the request(s) for model 'nemovl_0_0', message: Stub process 'nemovl_0_0' is not "
     "healthy.", 503, "model_not_ready"),
])
def test_triton_error_mapping(message: str, status: int, code: str) -> None:
    e = map_triton_error(message)
    assert (e.status, e.code) == (status, code)
    if status == 400:
        assert not e.message.startswith("[")


def test_triton_inputs_follow_the_interface() -> None:
    req = TritonRequest(messages=[{"role": "user", "content": [{"type": "image", "index": 0}]}],
                        images=[b"\x89PNG1", b"\xff\xd8JPEG2"], tools=[{"type": "function"}], params={"seed": 1})
    inputs = {i.name: i for i in build_request(req, "nemovl", "r1").inputs}
    assert set(inputs) == {"messages", "images", "tools", "params"}
    assert list(inputs["images"].shape) == [2] and inputs["images"].datatype == "BYTES"
    assert list(inputs["messages"].shape) == [1] and list(inputs["params"].shape) == [1]
    video = {i.name: i for i in build_request(TritonRequest(messages=[], video=b"\0\0\0 ftyp"), "nemovl", "r2").inputs}
    assert set(video) == {"messages", "video", "params"} and list(video["video"].shape) == [1]


def test_pool_balances_by_in_flight() -> None:
    from nemovl_trt.server.replicas import ReplicaState
    from nemovl_trt.server.triton_client import TritonPool

    async def go() -> None:
        pool = TritonPool([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], "nemovl", 10, 1)
        rs = pool.replicas
        a, b = rs.started()
        a.in_flight, b.in_flight = 3, 1
        assert rs.pick() is b
        b.in_flight = 5
        assert rs.pick() is a
        a.state = ReplicaState.DOWN  # a down: b is used even though it is busier
        assert rs.pick() is b
        a.state, a.in_flight, b.in_flight = ReplicaState.UP, 0, 0
        assert {rs.pick().url for _ in range(4)} == {a.url, b.url}  # ties alternate
        assert await pool.ready(force=True) is False  # nothing listens there
        await pool.close()

    asyncio.run(go())
