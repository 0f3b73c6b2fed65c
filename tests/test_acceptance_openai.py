"""OpenAI conformance of a running stack: the focused subset `make gpu-acceptance` runs against the
stack it started (``NEMOVL_ACCEPTANCE_BASE_URL=http://HOST:PORT/v1``), and that runs in the suite
against the session's cpu stack (the `api_server` fixture) when the variable is unset.

Protocol only, never the content of an answer (the suite's checkpoint has random weights): models,
health, non-streamed and streamed chat with usage, image and video inputs, error bodies and codes,
metrics. Uses the real `openai` SDK and plain httpx.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

ENV_URL = "NEMOVL_ACCEPTANCE_BASE_URL"


@dataclass(frozen=True)
class Target:
    base_url: str  # ends with /v1
    root_url: str
    model: str


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Target:
    url = os.environ.get(ENV_URL)
    if url:
        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        model = httpx.get(base + "/models", timeout=30).json()["data"][0]["id"]
        return Target(base, base.removesuffix("/v1"), model)
    api = request.getfixturevalue("api_server")
    return Target(api.base_url, api.root_url, api.model)


@pytest.fixture(scope="module")
def client(target: Target):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=target.base_url, api_key="unused", timeout=120, max_retries=0)


def _png(size=(96, 96)) -> str:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mp4() -> str:
    from nemovl_trt.training.tasks import encode_mp4

    frames = [np.full((64, 64, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    return "data:video/mp4;base64," + base64.b64encode(encode_mp4(frames, 2)).decode()


def _user(text: str, part: dict | None = None) -> list[dict]:
    content = ([part] if part else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def test_models_and_health(target: Target):
    r = httpx.get(target.base_url + "/models", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["id"] == target.model
    assert body["data"][0]["object"] == "model"
    assert httpx.get(f"{target.base_url}/models/{target.model}", timeout=30).status_code == 200
    r = httpx.get(target.base_url + "/models/no-such-model", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(target.base_url + "/health/ready", timeout=30).status_code == 200
    assert httpx.get(target.base_url + "/health/live", timeout=30).status_code == 200


def test_non_streamed_chat_shape_and_usage(client, target: Target):
    resp = client.chat.completions.create(model=target.model, messages=_user("Say hello."), max_tokens=4,
                                          temperature=0.0, extra_body={"ignore_eos": True})
    assert resp.object == "chat.completion" and resp.id
    assert len(resp.choices) == 1 and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    u = resp.usage
    assert u.completion_tokens == 4 and u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + 4


def test_streamed_chat_equals_non_streamed_and_ends_with_usage(client, target: Target):
    kw = {"model": target.model, "messages": _user("Count to three."), "max_tokens": 6, "temperature": 0.0,
          "seed": 7}
    full = client.chat.completions.create(**kw).choices[0].message.content or ""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert sum(c.usage is not None for c in chunks) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full


def test_image_and_video_inputs_add_prompt_tokens(client, target: Target):
    text = client.chat.completions.create(model=target.model, messages=_user("Describe."), max_tokens=1)
    image = client.chat.completions.create(model=target.model, max_tokens=1,
                                           messages=_user("Describe.", {"type": "image_url",
                                                                        "image_url": {"url": _png()}}))
    assert image.usage.prompt_tokens >= text.usage.prompt_tokens + 256  # one 512² tile = 256 image tokens
    video = client.chat.completions.create(model=target.model, max_tokens=1,
                                           messages=_user("Describe.", {"type": "video_url",
                                                                        "video_url": {"url": _mp4()}}))
    assert video.usage.prompt_tokens > text.usage.prompt_tokens
    assert video.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, status, code", [
    ({"model": "no-such-model"}, 404, "model_not_found"),
    ({"max_tokens": -1}, 400, None),
    ({"messages": _user("x", {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}})},
     400, "invalid_image"),
    ({"stream_options": {"include_usage": True}}, 400, None),
])
def test_error_status_and_body(target: Target, body: dict, status: int, code: str | None):
    req = {"model": target.model, "messages": _user("hi"), "max_tokens": 2, **body}
    r = httpx.post(target.base_url + "/chat/completions", json=req, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


def test_the_server_keeps_serving_after_errors_and_counts_requests(client, target: Target):
    httpx.post(target.base_url + "/chat/completions", json={"model": target.model, "messages": "bad"}, timeout=30)
    ok = client.chat.completions.create(model=target.model, messages=_user("Again."), max_tokens=1)
    assert ok.choices[0].finish_reason in ("stop", "length")
    metrics = httpx.get(target.root_url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "nemovl_requests_total" in metrics.text
