"""The ASGI edge (nemovl_trt/serving/edge.py) on a real uvicorn, without Triton: the real OpenAI app
(`create_app`, pointed at a closed port) for auth, guards, 503 + Retry-After and 500 containment, and small
ASGI apps for the deadline and draining paths."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from nemovl_trt.serving.edge import Availability, EdgeConfig, EdgeMiddleware, needs_key, request_id_from
from nemovl_trt.serving.openapi import openapi_document
from nemovl_trt.triton.launcher import free_port

M = "nvidia/nemotron-nano-12b-v2-vl"


@contextmanager
def serving(asgi) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="on", interface="asgi3"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)


class Switch:
    def __init__(self) -> None:
        self.serving = True

    def __call__(self) -> Availability:
        return Availability(True) if self.serving else Availability(False, 7, "tritonserver is restarting")


def real_app(**settings_kw):
    from nemovl_trt.server.app import create_app
    from nemovl_trt.server.settings import Settings

    app = create_app(Settings(triton_urls=[f"127.0.0.1:{free_port()}"], **settings_kw))  # nothing listens there

    @app.get("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    return app


@pytest.fixture(scope="module")
def edge_url() -> Iterator[tuple[str, Switch, EdgeMiddleware]]:
    switch = Switch()

    async def limits() -> tuple[int, int]:
        return 8192, 16

    edge = EdgeMiddleware(real_app(), EdgeConfig(api_key="sekret", max_body_bytes=1 << 20,
                                                 openapi=openapi_document(M, 8192)),
                          availability=switch, limits=limits, extra_metrics=lambda: b"extra_metric 1.0\n")
    with serving(edge) as url:
        yield url, switch, edge


AUTH = {"Authorization": "Bearer sekret"}


def chat(url: str, content: bytes | dict, headers: dict | None = None) -> httpx.Response:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    return httpx.post(url + "/v1/chat/completions", content=data,
                      headers={"content-type": "application/json", **AUTH, **(headers or {})}, timeout=20)


def err(r: httpx.Response) -> dict:
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


def test_api_key_routes(edge_url) -> None:
    url, _, _ = edge_url
    for path in ("/v1/models", "/v1/metadata", "/v1/models/x"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and err(r)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(url + "/v1/chat/completions", json={"model": M, "messages": []},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and err(r)["type"] == "authentication_error"
    assert httpx.get(url + "/v1/health/live").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/openapi.json").json()["openapi"] == "3.0.3"
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    assert needs_key("/v1/chat/completions") and not needs_key("/v1/health/ready") and not needs_key("/metrics")


@pytest.mark.parametrize("name,data,code,param", [
    ("seed over 2^64", {"model": M, "messages": [{"role": "user", "content": "x"}], "seed": 2 ** 64 + 1},
     "invalid_parameter", "seed"),
    ("lone surrogate", b'{"model":"%s","messages":[{"role":"user","content":"\\ud800"}]}' % M.encode(),
     "invalid_parameter", "messages[0].content"),
    ("nested 10,000", b"[" * 10_000 + b"]" * 10_000, "invalid_json", None),
    ("nested 100,000", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "invalid_json", None),
    ("NaN", b'{"model":"%s","messages":[],"temperature":NaN}' % M.encode(), "invalid_json", None),
    ("latin-1", '{"model":"é"}'.encode("latin-1"), "invalid_json", None),
    ("prompt cannot fit", {"model": M, "messages": [{"role": "user", "content": "z" * 200_000}]},
     "context_length_exceeded", "messages"),
])
def test_guards_answer_400_before_the_app(edge_url, name: str, data, code: str, param: str | None) -> None:
    url, _, _ = edge_url
    r = chat(url, data)
    assert r.status_code == 400, (name, r.text[:300])
    e = err(r)
    assert (e["code"], e["param"], e["type"]) == (code, param, "invalid_request_error")
    assert r.headers["x-request-id"].startswith("req-")


def test_body_cap_is_413(edge_url) -> None:
    url, _, _ = edge_url
    r = chat(url, b'{"model": "' + b"a" * (1 << 20) + b'"}')
    assert r.status_code == 413 and err(r)["code"] == "content_too_large"


def test_503_with_retry_after_while_restarting(edge_url) -> None:
    url, switch, _ = edge_url
    switch.serving = False
    try:
        r = chat(url, {"model": M, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and err(r)["code"] == "model_not_ready" and r.headers["retry-after"] == "7"
        r = httpx.get(url + "/v1/health/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "7" and "restarting" in err(r)["message"]
        # a bad request is still a 400 while restarting
        assert chat(url, b"[" * 100).status_code == 400
    finally:
        switch.serving = True
    # the app's own 503 (Triton unreachable) also carries Retry-After
    r = chat(url, {"model": M, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_unexpected_error_is_500_with_request_id_and_keeps_the_connection(edge_url) -> None:
    url, _, _ = edge_url
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/v1/boom", headers={**AUTH, "X-Request-Id": "my-id-1"})
    r = conn.getresponse()
    data = json.loads(r.read())
    sock = conn.sock
    assert r.status == 500 and r.getheader("x-request-id") == "my-id-1"
    assert data["error"]["code"] == "internal_error" and "request id my-id-1" in data["error"]["message"]
    assert (r.getheader("connection") or "").lower() != "close"
    conn.request("GET", "/v1/health/live")
    r2 = conn.getresponse()
    assert r2.status == 200 and json.loads(r2.read())["status"] == "live"
    assert conn.sock is sock  # same TCP connection
    conn.close()


def test_metrics_are_appended(edge_url) -> None:
    url, _, _ = edge_url
    text = httpx.get(url + "/metrics").text
    assert "nemovl_requests_total" in text  # the app's
    assert 'nemovl_edge_rejected_total{reason="guard"}' in text and "extra_metric 1.0" in text


def test_request_id_rules() -> None:
    assert request_id_from({"headers": [(b"x-request-id", b"abc-1.2")]}) == "abc-1.2"
    for bad in (b"has space", b"x" * 65, b"\xff"):
        assert request_id_from({"headers": [(b"x-request-id", bad)]}).startswith("req-")


# ------------------------------------------------------------------ deadline and draining (small ASGI apps)
class SlowApp:
    """POST /json answers after `delay` s; POST /sse streams one event every 0.1 s for `delay` s."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.finished = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = json.loads((await receive())["body"] or b"{}")
        delay = float(body.get("delay", 0))
        try:
            if scope["path"].endswith("sse"):
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream")]})
                t0 = time.monotonic()
                while time.monotonic() - t0 < delay:
                    await send({"type": "http.response.body", "body": b'data: {"x":1}\n\n', "more_body": True})
                    await asyncio.sleep(0.1)
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            else:
                await asyncio.sleep(delay)
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"ok":true}', "more_body": False})
            self.finished += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_request_timeout_cancels_and_answers_504() -> None:
    app = SlowApp()
    edge = EdgeMiddleware(app, EdgeConfig(request_timeout_s=0.5, guard_bodies=False))
    edge_path = "/v1/chat/completions"
    with serving(edge) as url:
        # the edge applies the deadline to the chat route; route the fake app through it
        r = httpx.post(url + edge_path, json={"delay": 0.0})
        # the client can have the whole answer before the app's coroutine resumes after its last send
        deadline = time.monotonic() + 5
        while app.finished == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.status_code == 200 and app.finished == 1
        t0 = time.monotonic()
        r = httpx.post(url + edge_path, json={"delay": 5.0}, timeout=10)
        took = time.monotonic() - t0
        assert r.status_code == 504 and err(r)["code"] == "timeout" and err(r)["type"] == "timeout_error"
        assert took < 4.0 and app.cancelled == 1


def test_request_timeout_on_a_started_stream_ends_with_an_error_event() -> None:
    app = SlowApp()

    class SseRoute:
        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http":
                scope = {**scope, "path": "/sse"}
            await app(scope, receive, send)

    edge = EdgeMiddleware(SseRoute(), EdgeConfig(request_timeout_s=0.5, guard_bodies=False))
    with serving(edge) as url, httpx.stream("POST", url + "/v1/chat/completions", json={"delay": 5.0},
                                            timeout=10) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and lines[0] == 'data: {"x":1}'
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "timeout"
    assert lines[-1] == "data: [DONE]" and app.cancelled == 1


def test_drain_refuses_new_and_cuts_the_rest_after_grace() -> None:
    app = SlowApp()
    edge = EdgeMiddleware(app, EdgeConfig(guard_bodies=False))
    with serving(edge) as url:
        out: dict = {}

        def long_request() -> None:
            out["r"] = httpx.post(url + "/v1/chat/completions", json={"delay": 30.0}, timeout=20)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)
        edge.begin_drain(1.0)
        r = httpx.post(url + "/v1/chat/completions", json={"delay": 0})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        t.join(15)
        assert not t.is_alive()
        assert out["r"].status_code == 503 and err(out["r"])["message"].startswith("The server is shutting down")
        assert app.cancelled == 1


class BodyProbe:
    """An ASGI app that records what reaches it: the decoded body in the scope, and the raw body it reads."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        from nemovl_trt.serving.edge import PARSED_BODY_KEY

        msg = await receive()
        self.seen.append((scope.get("state", {}).get(PARSED_BODY_KEY, "absent"), msg.get("body", b"")))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("guard", [True, False])
def test_the_body_is_decoded_once_and_handed_to_the_app(guard: bool) -> None:
    """With the guards on, the app gets the value they decoded (so it does not parse the body again) and the
    same raw bytes; with them off, nothing is decoded at the edge."""
    app = BodyProbe()
    data = json.dumps({"model": M, "messages": [{"role": "user", "content": "héllo"}], "seed": 2 ** 63 - 1,
                       "temperature": 0.25}, ensure_ascii=False).encode()
    with serving(EdgeMiddleware(app, EdgeConfig(guard_bodies=guard))) as url:
        r = httpx.post(url + "/v1/chat/completions", content=data, headers={"content-type": "application/json"})
        assert r.status_code == 200
        httpx.get(url + "/v1/models")
    (decoded, raw), (other, _) = app.seen
    assert raw == data and other == "absent"
    assert decoded == (json.loads(data) if guard else "absent")
    if guard:
        assert type(decoded["seed"]) is int and decoded["messages"][0]["content"] == "héllo"
