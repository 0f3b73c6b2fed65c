"""The OpenAI frontend against a real tritonserver on loopback, with the official `openai` SDK (sync,
async, streaming), LangChain's ChatOpenAI, raw httpx for SSE framing, and the docs/api.md rows."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_server import ApiServer

pytestmark = pytest.mark.integration

SMALL = 6  # max_tokens for most requests: keep the suite fast


# ---------------------------------------------------------------- helpers
def png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 256)], -1)
    img = Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: int, fps: int, w: int = 96, h: int = 64) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            arr = np.full((h, w, 3), (i * 15) % 256, np.uint8)
            arr[:, : (i * 5) % w] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def user(*parts: Any) -> list[dict[str, Any]]:
    content: Any = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else [
        {"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def metrics(api: ApiServer) -> dict[str, float]:
    """Flattened samples: 'name{k=v,...}' → value."""
    text = httpx.get(api.root_url + "/metrics").text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def post(api: ApiServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(api.base_url + "/chat/completions", json=body, timeout=120)


def sse_events(api: ApiServer, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    with httpx.stream("POST", api.base_url + "/chat/completions", json=body, timeout=120) as r:
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return r, events


@pytest.fixture(scope="module")
def sdk(api_server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vlm_cfg(tiny_ckpt_dir):
    from nemovl_trt.checkpoint.config import load_vlm_config

    return load_vlm_config(tiny_ckpt_dir)


@pytest.fixture(scope="module")
def meta(api_server: ApiServer) -> dict[str, Any]:
    r = httpx.get(api_server.base_url + "/metadata")
    assert r.status_code == 200, r.text
    return r.json()


def ok_after(sdk: openai.OpenAI, model: str) -> None:
    """The next request after an error is served."""
    r = sdk.chat.completions.create(model=model, messages=user("still there?"), max_tokens=1)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


# ---------------------------------------------------------------- endpoints
def test_models_health_metadata(api_server: ApiServer, sdk: openai.OpenAI, meta: dict[str, Any]) -> None:
    models = sdk.models.list()
    assert [m.id for m in models.data] == [api_server.model]
    m = httpx.get(f"{api_server.base_url}/models/{api_server.model}").json()
    assert m["object"] == "model" and m["owned_by"] and isinstance(m["created"], int)
    assert m["max_model_len"] == meta["limits"]["max_seq_len"] and m["max_model_len"] > 0
    assert sdk.models.retrieve(api_server.model).id == api_server.model
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"
    for path in ("/v1/health/ready", "/v1/health/live", "/health"):
        assert httpx.get(api_server.root_url + path).status_code == 200, path
    assert meta["target"] == "cpu"
    assert set(meta["limits"]) == {"max_seq_len", "max_num_tiles", "max_images", "max_video_frames"}
    assert meta["limits"]["max_images"] >= 1 and meta["limits"]["max_num_tiles"] >= 1


# ---------------------------------------------------------------- text, sync / async / stream
def test_sync_text(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(model=api_server.model, messages=user("Say hello."), max_tokens=SMALL,
                                    temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == api_server.model
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= SMALL and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 0


def test_multi_turn_and_max_completion_tokens(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    r = sdk.chat.completions.create(model=api_server.model, messages=msgs, max_tokens=50,
                                    max_completion_tokens=3, temperature=1.0, seed=1,
                                    extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    short = sdk.chat.completions.create(model=api_server.model, messages=msgs[:2], max_tokens=1)
    assert r.usage.prompt_tokens > short.usage.prompt_tokens


def _stream_text(sdk: openai.OpenAI, model: str, **kw: Any) -> tuple[str, str, list[Any]]:
    chunks = list(sdk.chat.completions.create(model=model, stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    return content, reasoning, chunks


@pytest.mark.parametrize("system", [None, "/think"])
def test_stream_equals_non_stream_for_same_seed(api_server: ApiServer, sdk: openai.OpenAI, system: str | None) -> None:
    msgs = ([{"role": "system", "content": system}] if system else []) + user("Tell me a story.")
    kw = {"messages": msgs, "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    full = sdk.chat.completions.create(model=api_server.model, **kw)
    content, reasoning, chunks = _stream_text(sdk, api_server.model, **kw)
    assert content == (full.choices[0].message.content or "")
    assert reasoning == (getattr(full.choices[0].message, "reasoning_content", None) or "")
    assert content or reasoning
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]


def test_sse_framing(api_server: ApiServer) -> None:
    body = {"model": api_server.model, "messages": user("Count."), "max_tokens": SMALL, "stream": True,
            "stream_options": {"include_usage": True}, "seed": 3}
    r, events = sse_events(api_server, body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_finish = [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(with_finish) == 1
    usage = chunks[-1]
    assert usage["choices"] == [] and with_finish[0] == len(chunks) - 2
    assert usage["usage"]["completion_tokens"] <= SMALL
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    # without include_usage: no usage chunk
    _, events = sse_events(api_server, {**body, "stream_options": {"include_usage": False}})
    assert all("usage" not in e for e in events[:-1]) and events[-2]["choices"][0]["finish_reason"]


def http_chunks(api: ApiServer, body: dict[str, Any]) -> tuple[int, list[bytes]]:
    """POST `body` over a plain socket and return (status, the HTTP/1.1 chunks of the response body): each
    chunk is one ASGI body message of the frontend, i.e. one write."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(api.root_url)
    data = json.dumps(body).encode()
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        raw = b""
        while piece := sock.recv(65536):
            raw += piece
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
    return int(head.split(b" ", 2)[1]), chunks


def test_events_ready_together_share_one_write(api_server: ApiServer) -> None:
    """The role chunk goes out with the first generated text, and the finish chunk with the usage chunk and
    [DONE]: one HTTP chunk (one ASGI message, one write) each; in between, one chunk per Triton response.
    (When Triton delivers the whole generation in one response, all of it is one write.)"""
    body = {"model": api_server.model, "messages": user("Count."), "max_tokens": SMALL, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0, "ignore_eos": True}
    status, chunks = http_chunks(api_server, body)
    assert status == 200 and chunks
    events = [[json.loads(b[6:]) if b != b"data: [DONE]" else "[DONE]" for b in c.split(b"\n\n") if b]
              for c in chunks]
    first, last = events[0], events[-1]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(first) >= 2 and first[1]["choices"][0]["delta"].get("content"), first  # never the role alone
    assert last[-1] == "[DONE]" and last[-2]["choices"] == [] and last[-2]["usage"]["completion_tokens"] == SMALL
    assert last[-3]["choices"][0]["finish_reason"] == "length"
    flat = [e for c in events for e in c if e != "[DONE]" and e["choices"]]
    assert [e["choices"][0]["finish_reason"] for e in flat].count("length") == 1
    assert all(len(c) == 1 for c in events[1:-1])  # one event per Triton response in between
    # every token's text is in exactly one event, and the stream equals the non-streamed answer
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in flat)
    full = post(api_server, {k: v for k, v in body.items() if k not in ("stream", "stream_options")}).json()
    assert text == full["choices"][0]["message"]["content"]
    # without usage: the finish chunk and [DONE] still share the last write
    _, chunks = http_chunks(api_server, {**body, "stream_options": {"include_usage": False}})
    tail = chunks[-1].split(b"\n\n")
    assert tail[-2:] == [b"data: [DONE]", b""] and b'"finish_reason":"length"' in tail[-3]


def test_async_batch(api_server: ApiServer) -> None:
    async def go() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=api_server.model, messages=user(f"item {i}"), max_tokens=4, seed=i) for i in range(4)))
        finally:
            await client.close()

    results = asyncio.run(go())
    assert len({r.id for r in results}) == 4
    assert all(r.usage.completion_tokens >= 1 for r in results)


def test_async_stream(api_server: ApiServer) -> None:
    async def go() -> tuple[str, int]:
        client = openai.AsyncOpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0)
        try:
            stream = await client.chat.completions.create(model=api_server.model, messages=user("hi"), max_tokens=4,
                                                          stream=True, stream_options={"include_usage": True})
            text, usage = "", 0
            async for c in stream:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                if c.usage:
                    usage = c.usage.completion_tokens
            return text, usage
        finally:
            await client.close()

    _, usage = asyncio.run(go())
    assert 1 <= usage <= 4


def test_langchain(api_server: ApiServer) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=api_server.model, base_url=api_server.base_url, api_key="unused", max_tokens=SMALL,
                     temperature=0.5, seed=11, max_retries=0)
    msg = llm.invoke([HumanMessage(content="Hello there")])
    assert isinstance(msg.content, str)
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    assert msg.usage_metadata["output_tokens"] >= 1
    streamed = "".join(str(c.content) for c in llm.stream([HumanMessage(content="Hello there")]))
    assert streamed == msg.content
    img = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes(64, 48))}}])
    assert llm.invoke([img]).usage_metadata["input_tokens"] > msg.usage_metadata["input_tokens"]


# ---------------------------------------------------------------- images
def test_image_prompt_tokens(api_server: ApiServer, sdk: openai.OpenAI, vlm_cfg, tiny_ckpt_dir,
                             meta: dict[str, Any]) -> None:
    """prompt_tokens(image + text) == prompt_tokens(text) + 256·tiles + 2 (<img>, </img>) + the template's
    part separator; the same for an allowed http URL, a data: URL and bare base64."""
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer
    from nemovl_trt.preprocess.image import num_tiles

    tok = load_tokenizer(tiny_ckpt_dir)
    sep = len(tok.encode(vlm_cfg.img_context_token + "\nDescribe.")) - 1 - len(tok.encode("Describe."))
    w, h = 600, 300
    data = png_bytes(w, h)
    api_server.media.files["wide.png"] = ("image/png", data)
    text = sdk.chat.completions.create(model=api_server.model, messages=user("Describe."), max_tokens=1)
    base = text.usage.prompt_tokens
    per_tile = vlm_cfg.tokens_per_tile
    tile = vlm_cfg.force_image_size
    urls = {"url": api_server.media.url("wide.png"), "data": "data:image/png;base64," + b64(data), "bare": b64(data)}
    seen = {}
    for name, url in urls.items():
        r = sdk.chat.completions.create(model=api_server.model, messages=user(image_part(url), "Describe."),
                                        max_tokens=1)
        seen[name] = r.usage.prompt_tokens
    assert api_server.media.hits["wide.png"] == 1
    tiles = num_tiles(w, h, meta["limits"]["max_num_tiles"], tile, vlm_cfg.use_thumbnail)
    assert tiles > 1
    assert seen == {k: base + per_tile * tiles + 2 + sep for k in urls}, (seen, base, tiles, sep)
    one = sdk.chat.completions.create(model=api_server.model, messages=user(image_part(urls["data"]), "Describe."),
                                      max_tokens=1, extra_body={"mm_processor_kwargs": {"max_num_tiles": 1}})
    assert one.usage.prompt_tokens == base + per_tile * num_tiles(w, h, 1, tile, vlm_cfg.use_thumbnail) + 2 + sep
    two = sdk.chat.completions.create(
        model=api_server.model, max_tokens=1, extra_body={"mm_processor_kwargs": {"max_num_tiles": 1}},
        messages=user(image_part(urls["data"]), image_part(b64(png_bytes(40, 40, "L"))), "Describe."))
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + per_tile + 2 + sep


def test_metrics_move(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    before = metrics(api_server)
    sdk.chat.completions.create(model=api_server.model, messages=user(image_part(b64(png_bytes(64, 64))), "hi"),
                                max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=api_server.model, messages=user("x"), max_tokens=1, n=0)
    after = metrics(api_server)

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert d("nemovl_requests_total{status=200}") == 1
    assert d("nemovl_requests_total{status=400}") == 1
    assert d("nemovl_images_total{}") == 1 and d("nemovl_image_tiles_total{}") >= 1
    assert d("nemovl_prompt_tokens_total{}") > 0 and 1 <= d("nemovl_completion_tokens_total{}") <= 2
    assert d("nemovl_request_latency_seconds_count{}") == 2
    assert d("nemovl_time_to_first_token_seconds_count{}") == 1
    assert after["nemovl_requests_in_flight{}"] == 0 and after["nemovl_queue_depth{}"] == 0


# ---------------------------------------------------------------- errors, each followed by a good request
def _error_cases(api: ApiServer, meta: dict[str, Any]) -> list[tuple[str, dict[str, Any], int, str]]:
    api.media.files["ok.png"] = ("image/png", png_bytes(64, 64))
    api.media.files["clip.mp4"] = ("video/mp4", mp4_bytes(16, 4))
    good_img = image_part("data:image/png;base64," + b64(png_bytes(64, 64)))
    clip = video_part("data:video/mp4;base64," + b64(mp4_bytes(16, 4)))
    n_img = meta["limits"]["max_images"]
    return [
        ("garbage image", {"messages": user(image_part("data:image/png;base64," + b64(b"not an image at all")))},
         400, "invalid_image"),
        ("tiny image", {"messages": user(image_part(b64(png_bytes(16, 16))), "x")}, 400, "image_too_small"),
        ("too many images", {"messages": user(*([good_img] * (n_img + 1)))}, 400, "too_many_images"),
        ("video and image", {"messages": user(good_img, clip)}, 400, "video_with_images"),
        ("two videos", {"messages": user(clip, clip)}, 400, "too_many_videos"),
        ("fps above the clip", {"messages": user(clip, "x"), "media_io_kwargs": {"video": {"fps": 30}}}, 400,
         "invalid_video_sampling"),
        ("num_frames above the clip", {"messages": user(clip, "x"), "media_io_kwargs": {"video": {"num_frames": 64}}},
         400, "invalid_video_sampling"),
        ("fps and num_frames", {"messages": user(clip), "media_io_kwargs": {"video": {"fps": 1, "num_frames": 8}}},
         400, "invalid_video_sampling"),
        ("garbage video", {"messages": user(video_part(b64(b"\0" * 64)))}, 400, "invalid_video"),
        ("loopback url", {"messages": user(image_part(api.media.url("ok.png", host="127.0.0.1")))}, 400,
         "invalid_image_url"),
        ("missing url", {"messages": user(image_part(api.media.url("missing.png")))}, 400, "invalid_image_url"),
        ("unresolvable url", {"messages": user(image_part("http://nothing.invalid/x.png"))}, 400, "invalid_image_url"),
        ("context too long", {"messages": user("hi"), "max_tokens": meta["limits"]["max_seq_len"] - 2}, 400,
         "context_length_exceeded"),
        ("long prompt", {"messages": user("word " * (meta["limits"]["max_seq_len"] * 2))}, 400,
         "context_length_exceeded"),
        ("tiles out of range", {"messages": user("x"), "mm_processor_kwargs": {"max_num_tiles": 13}}, 400,
         "invalid_parameter"),
        ("temperature", {"messages": user("x"), "temperature": 3}, 400, "invalid_parameter"),
        ("strict schema, unknown keyword", {"messages": user("x"), "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
                "type": "object", "properties": {"a": {"type": "string", "shape": "round"}}}}}}, 400,
         "invalid_json_schema"),
        ("top_logprobs over 20", {"messages": user("x"), "logprobs": True, "top_logprobs": 21}, 400,
         "invalid_parameter"),
        ("n = 0", {"messages": user("x"), "n": 0}, 400, "invalid_parameter"),
        ("n over the cap", {"messages": user("x"), "n": 9}, 400, "invalid_parameter"),
        ("logit_bias out of range", {"messages": user("x"), "logit_bias": {"5": 150}}, 400, "invalid_parameter"),
        ("logit_bias token outside the vocabulary", {"messages": user("x"), "logit_bias": {"99999999": 1}}, 400,
         "invalid_parameter"),
        ("stream_options without stream", {"messages": user("x"), "stream_options": {"include_usage": True}}, 400,
         "invalid_parameter"),
        ("unknown model", {"model": "gpt-4o", "messages": user("x")}, 404, "model_not_found"),
    ]


def test_errors_then_next_request_succeeds(api_server: ApiServer, sdk: openai.OpenAI, meta: dict[str, Any]) -> None:
    failures = []
    for name, fields, status, code in _error_cases(api_server, meta):
        body = {"model": api_server.model, "max_tokens": 2, **fields}
        r = post(api_server, body)
        err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
        if r.status_code != status or not err or err.get("code") != code or set(err) != {"message", "type", "param", "code"}:
            failures.append((name, r.status_code, r.text[:300]))
        ok_after(sdk, api_server.model)
    assert not failures, failures


def test_sdk_error_types(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=api_server.model, messages=user("x"), n=99)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    r = httpx.get(api_server.root_url + "/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.put(api_server.base_url + "/chat/completions", json={})
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------- video, reasoning, tools
def test_video_and_think_warning(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    clip = mp4_bytes(16, 4)  # 4 s at 4 fps
    api_server.media.files["clip.mp4"] = ("video/mp4", clip)
    before = metrics(api_server)
    plain = sdk.chat.completions.with_raw_response.create(
        model=api_server.model, max_tokens=2, messages=user(video_part(api_server.media.url("clip.mp4")), "What?"),
        extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}})
    assert "x-nemovl-warning" not in plain.headers
    assert plain.parse().usage.prompt_tokens > 2
    think = sdk.chat.completions.with_raw_response.create(
        model=api_server.model, max_tokens=2,
        messages=[{"role": "system", "content": "/think"}] + user(video_part("data:video/mp4;base64," + b64(clip)), "What?"),
        extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}, "video_pruning_rate": 0.5})
    assert think.headers.get("x-nemovl-warning")
    body = json.loads(think.text)
    assert body["warnings"] and all(isinstance(w, str) for w in body["warnings"])
    assert body["choices"][0]["message"].get("reasoning_content") is None  # reasoning is off for video
    r, events = sse_events(api_server, {
        "model": api_server.model, "max_tokens": 2, "stream": True, "media_io_kwargs": {"video": {"num_frames": 2}},
        "messages": [{"role": "system", "content": "/think"}] + user(video_part(b64(clip)), "What?")})
    assert r.headers.get("x-nemovl-warning") == think.headers.get("x-nemovl-warning")
    assert events[0]["warnings"] == body["warnings"]
    assert all("warnings" not in e for e in events[1:-1])
    after = metrics(api_server)
    assert after["nemovl_video_frames_total{}"] - before.get("nemovl_video_frames_total{}", 0) == 6
    assert after["nemovl_evs_pruned_tokens_total{}"] > before.get("nemovl_evs_pruned_tokens_total{}", 0)


def test_reasoning_fields(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(model=api_server.model, max_tokens=8, seed=5,
                                    messages=[{"role": "system", "content": "/think"}] + user("Why?"))
    msg = r.choices[0].message
    assert (getattr(msg, "reasoning_content", None) or "") + (msg.content or "")
    r = sdk.chat.completions.create(model=api_server.model, max_tokens=8, seed=5, messages=user("Why?"))
    assert "<think>" not in (r.choices[0].message.content or "")


def test_tools_request_is_accepted(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    with_tools = sdk.chat.completions.create(model=api_server.model, max_tokens=4, messages=user("Weather in Paris?"),
                                             tools=tools, tool_choice="auto")
    without = sdk.chat.completions.create(model=api_server.model, max_tokens=4, messages=user("Weather in Paris?"),
                                          tools=tools, tool_choice="none")
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens  # the tool list reached the template
    assert with_tools.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for call in with_tools.choices[0].message.tool_calls or []:
        assert len(call.id) >= 9 and isinstance(json.loads(call.function.arguments), dict)


# ---------------------------------------------------------------- disconnect, back-pressure
def _llm_active(grpc_url: str) -> list[str]:
    import tritonclient.grpc.aio as aio

    async def go() -> list[str]:
        client = aio.InferenceServerClient(grpc_url)
        try:
            ids = aio.InferInput("input_ids", [0], "INT64")
            ids.set_data_from_numpy(np.zeros((0,), np.int64))
            ctl = aio.InferInput("control", [1], "BYTES")
            ctl.set_data_from_numpy(np.array([b'{"op": "stats"}'], dtype=object))

            async def reqs():
                yield {"model_name": "llm", "inputs": [ids, ctl]}

            async for result, error in client.stream_infer(reqs()):
                assert error is None, error
                return json.loads(result.as_numpy("info").reshape(-1)[0])["active"]
            return []
        finally:
            await client.close()

    return asyncio.run(go())


def test_disconnect_mid_stream_frees_the_engine(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    body = {"model": api_server.model, "messages": user("Write a long story."), "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    cancelled0 = metrics(api_server).get("nemovl_requests_cancelled_total{}", 0.0)
    with httpx.stream("POST", api_server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
            if got >= 3:
                break
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        if api_server.state.pool.in_flight == 0 and not _llm_active(api_server.triton.grpc_url):
            break
        time.sleep(0.1)
    freed_s = time.monotonic() - t0
    assert api_server.state.pool.in_flight == 0
    assert _llm_active(api_server.triton.grpc_url) == []
    assert freed_s < 5
    assert metrics(api_server)["nemovl_requests_cancelled_total{}"] == cancelled0 + 1
    t1 = time.monotonic()
    ok_after(sdk, api_server.model)
    assert time.monotonic() - t1 < 10


def test_queue_full_gives_429(api_server: ApiServer) -> None:
    adm = api_server.state.admission
    limit = api_server.state.settings.max_concurrent + api_server.state.settings.max_queued

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": api_server.model, "messages": user("x"), "max_tokens": 16, "ignore_eos": True}
            return await asyncio.gather(*(c.post(api_server.base_url + "/chat/completions", json=body)
                                          for _ in range(limit + 4)))

    rs = asyncio.run(go())
    codes = sorted(r.status_code for r in rs)
    rejected = [r for r in rs if r.status_code == 429]
    assert codes.count(200) >= limit - 1 and rejected, codes
    assert all(r.headers.get("retry-after") and r.json()["error"]["type"] == "rate_limit_error" for r in rejected)
    assert adm.active == 0 and adm.waiting == 0


def test_frontend_overhead(api_server: ApiServer) -> None:
    """Median latency of a 1-token request through the frontend vs the same request straight to Triton."""
    import statistics

    import tritonclient.grpc.aio as aio

    from nemovl_trt.server.triton_client import TritonRequest
    from tests.triton_inputs import build_inputs

    msgs = [{"role": "user", "content": "Hello"}]
    n = 15

    async def direct() -> list[float]:
        client = aio.InferenceServerClient(api_server.triton.grpc_url)
        out = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                inputs = build_inputs(TritonRequest(messages=msgs, params={"max_tokens": 1, "seed": 0}))

                async def reqs(inputs=inputs):
                    yield {"model_name": "nemovl", "inputs": inputs}

                async for result, error in client.stream_infer(reqs()):
                    assert error is None
                    fr = result.as_numpy("finish_reason").reshape(-1)[0]
                    if fr:
                        break
                out.append(time.perf_counter() - t0)
        finally:
            await client.close()
        return out

    def via_api() -> list[float]:
        out = []
        with httpx.Client(timeout=60) as c:
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post(api_server.base_url + "/chat/completions",
                           json={"model": api_server.model, "messages": msgs, "max_tokens": 1, "seed": 0})
                assert r.status_code == 200
                out.append(time.perf_counter() - t0)
        return out

    asyncio.run(direct())  # warm up
    d = statistics.median(asyncio.run(direct()))
    a = statistics.median(via_api())
    print(f"\n[frontend overhead] direct Triton p50 {d * 1e3:.1f} ms, via API p50 {a * 1e3:.1f} ms, "
          f"overhead {(a - d) * 1e3:.1f} ms")
    assert a - d < 0.1  # generous: client and server share one process (GIL) on a loaded 2-core machine


def test_stop_string_is_honoured_and_not_returned(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    kw = {"model": api_server.model, "messages": user("Go on."), "max_tokens": 24, "temperature": 1.0, "seed": 99,
          "extra_body": {"ignore_eos": True}}
    full = sdk.chat.completions.create(**kw).choices[0].message.content or ""
    words = [w for w in full.split() if len(w) >= 2]
    if len(full) < 8 or not words:
        pytest.skip("the tiny model produced no usable text for this seed")
    stop = words[len(words) // 2]
    cut = sdk.chat.completions.create(**kw, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)].lstrip() or \
        (cut.choices[0].message.content or "") == full[:full.index(stop)]
    assert stop not in (cut.choices[0].message.content or "")


def test_disconnect_non_streaming_frees_the_engine(api_server: ApiServer) -> None:
    import socket

    body = json.dumps({"model": api_server.model, "messages": user("Long answer please."), "max_tokens": 2000,
                       "ignore_eos": True}).encode()
    host, port = api_server.root_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        t0 = time.monotonic()
        while not _llm_active(api_server.triton.grpc_url) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert _llm_active(api_server.triton.grpc_url), "the request never reached the engine"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and (_llm_active(api_server.triton.grpc_url) or api_server.state.pool.in_flight):
        time.sleep(0.1)
    assert _llm_active(api_server.triton.grpc_url) == [] and api_server.state.pool.in_flight == 0
    assert time.monotonic() - t0 < 5


def test_error_after_stream_started_is_one_event_then_done(api_server: ApiServer) -> None:
    """A generation that outlives the server's stream limit: the SSE stream ends with one error event and
    [DONE] (no finish_reason chunk), and the engine slot is freed. A second app with a 1 s limit in front of
    the same tritonserver, driven in-process."""
    from nemovl_trt.server.app import create_app
    from nemovl_trt.server.settings import Settings

    app = create_app(Settings(triton_urls=[api_server.triton.grpc_url], triton_timeout_s=1.0))
    body = {"model": api_server.model, "messages": user("Go."), "max_tokens": 3000, "ignore_eos": True,
            "stream": True}

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            r = await c.post("/v1/chat/completions", json=body)
            await app.state.nemovl.pool.close()
            return r

    r = asyncio.run(go())
    assert r.status_code == 200
    blocks = r.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    events = [json.loads(b[len("data: "):]) for b in blocks[:-2]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "timeout"
    assert all("error" not in e for e in events[:-1])
    assert not any(c["choices"][0]["finish_reason"] for c in events[:-1])
    t0 = time.monotonic()
    while _llm_active(api_server.triton.grpc_url) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert _llm_active(api_server.triton.grpc_url) == []


def test_cli_serve_attaches_to_triton(api_server: ApiServer) -> None:
    """`nemovl serve --triton HOST:PORT` in its own process: serves, then one SIGINT stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.fixtures_server import free_port

    port = free_port()
    exe = Path(sys.executable).parent / "nemovl"
    proc = subprocess.Popen([str(exe), "serve", "--triton", api_server.triton.grpc_url, "--host", "127.0.0.1",
                             "--port", str(port), "--api-key", "k3y", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            try:
                if httpx.get(url + "/v1/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        r = client.chat.completions.create(model=api_server.model, messages=user("hi"), max_tokens=2)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model=api_server.model, messages=user("hi"), max_tokens=2)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/v1" in out
