"""The two streaming clients the serving benchmark compares, sending the same workload.

(a) `OpenAIClient`: the OpenAI SDK (`AsyncOpenAI`, `stream=True`) against the frontend's
    /v1/chat/completions — what users run.
(b) `TritonClient`: `tritonclient.grpc.aio` bidirectional streaming against the `nemovl` entry model
    (tensor interface in docs/interfaces.md) — the same server without the frontend.

Both return a `RequestRecord` per request; neither raises for a failed request.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.loadgen import RequestRecord

ENTRY_MODEL = "nemovl"


@dataclass(frozen=True)
class Workload:
    """One request shape, expressed for both paths.

    `prompt`: the user text; `images`: encoded image bytes; `video`: encoded video bytes or None;
    `params`: the entry model's `params` JSON (max_tokens, temperature, seed, fps, …); the OpenAI path
    maps them to the request fields the frontend documents.
    """

    name: str
    prompt: str
    images: tuple[bytes, ...] = ()
    video: bytes | None = None
    image_mime: str = "image/jpeg"
    video_mime: str = "video/mp4"
    params: dict[str, Any] = field(default_factory=dict)

    def triton_messages(self) -> list[dict[str, Any]]:
        """Chat messages with media referenced by index (the entry model's `messages` input)."""
        parts: list[dict[str, Any]] = [{"type": "image", "index": i} for i in range(len(self.images))]
        if self.video is not None:
            parts.append({"type": "video", "index": 0})
        parts.append({"type": "text", "text": self.prompt})
        return [{"role": "user", "content": parts}]

    def openai_messages(self) -> list[dict[str, Any]]:
        """Chat messages with media as base64 data URLs (what OpenAI SDK users send)."""
        parts: list[dict[str, Any]] = []
        for img in self.images:
            url = f"data:{self.image_mime};base64,{base64.b64encode(img).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        if self.video is not None:
            url = f"data:{self.video_mime};base64,{base64.b64encode(self.video).decode('ascii')}"
            parts.append({"type": "video_url", "video_url": {"url": url}})
        parts.append({"type": "text", "text": self.prompt})
        return [{"role": "user", "content": parts}]

    def openai_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `chat.completions.create` equivalent to `params`."""
        p = dict(self.params)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key in ("max_tokens", "temperature", "top_p", "seed", "stop"):
            if key in p:
                kwargs[key] = p.pop(key)
        if "top_k" in p:
            extra["top_k"] = p.pop("top_k")
        if "ignore_eos" in p:
            extra["ignore_eos"] = p.pop("ignore_eos")
        video_kw = {k: p.pop(k) for k in ("fps", "num_frames") if k in p}
        if video_kw:
            extra["media_io_kwargs"] = {"video": video_kw}
        if "max_num_tiles" in p:
            extra["mm_processor_kwargs"] = {"max_num_tiles": p.pop("max_num_tiles")}
        if "video_pruning_rate" in p:
            extra["video_pruning_rate"] = p.pop("video_pruning_rate")
        if p:
            raise ValueError(f"params without an OpenAI mapping: {sorted(p)}")
        if extra:
            kwargs["extra_body"] = extra
        return kwargs


def _failed(start: float, exc: Exception) -> RequestRecord:
    """A request that raised: recorded with its elapsed time and a short error text."""
    return RequestRecord(ok=False, start_s=start, e2e_s=time.perf_counter() - start,
                         error=f"{type(exc).__name__}: {str(exc)[:200]}")


def _streamed_record(start: float, e2e: float, ttft: float | None, tokens: tuple[int, int] | None,
                     extra: dict[str, Any] | None = None) -> RequestRecord:
    """A finished OpenAI stream; `tokens` = (completion, prompt) from its usage chunk, None when it sent none."""
    if tokens is None:
        return RequestRecord(ok=False, start_s=start, e2e_s=e2e, ttft_s=ttft, error="no usage chunk")
    kw = {"extra": extra} if extra is not None else {}
    return RequestRecord(ok=True, start_s=start, e2e_s=e2e, ttft_s=ttft, completion_tokens=tokens[0],
                         prompt_tokens=tokens[1], **kw)


class OpenAIClient:
    """Streams chat completions from the frontend with the OpenAI SDK (one shared HTTP connection pool)."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 120.0) -> None:
        from openai import AsyncOpenAI

        self.model = model
        self._client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=timeout_s)

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()

    async def send(self, workload: Workload, overrides: dict[str, Any] | None = None) -> RequestRecord:
        """Send one streamed request; TTFT is the first chunk that carries generated text."""
        kwargs = Workload(**{**workload.__dict__, "params": {**workload.params, **(overrides or {})}}).openai_kwargs()
        messages = workload.openai_messages()
        start = time.perf_counter()
        ttft: float | None = None
        usage = None
        chunks = 0
        try:
            stream = await self._client.chat.completions.create(
                model=self.model, messages=messages, stream=True,
                stream_options={"include_usage": True}, **kwargs,
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta
                    text = (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
                    if text:
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - start
            e2e = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 — a failed request is a data point, not a crash
            return _failed(start, exc)
        tokens = None if usage is None else (int(usage.completion_tokens), int(usage.prompt_tokens))
        return _streamed_record(start, e2e, ttft, tokens, extra={"chunks": chunks})


try:  # the raw client parses each event with orjson when it is there (the cheapest parse), else json
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    from json import loads as _loads


def sse_payloads(buffer: bytearray, data: bytes) -> list[bytes]:
    """Append `data` to `buffer` and pop the payloads of the complete `data: ...` events in it (an event ends
    with a blank line; other SSE fields are ignored)."""
    buffer += data
    out: list[bytes] = []
    start = 0
    while True:
        end = buffer.find(b"\n\n", start)
        if end < 0:
            break
        event = bytes(buffer[start:end])
        start = end + 2
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                out.append(line[6:])
    del buffer[:start]
    return out


class RawSSEClient:
    """The same request as `OpenAIClient`, posted with plain httpx: the body encoded before the clock starts
    (as the Triton client builds its tensors first), the stream read as raw bytes, split into events and each
    parsed once. The cheapest honest HTTP client, so (this) − (Triton direct) is the frontend's own cost, and
    (OpenAI SDK) − (this) the SDK's client-side cost."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 120.0) -> None:
        import httpx

        self.model = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False)

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.aclose()

    def body(self, workload: Workload, overrides: dict[str, Any] | None = None) -> bytes:
        """The JSON request body (what `OpenAIClient` sends for the same workload)."""
        kwargs = Workload(**{**workload.__dict__, "params": {**workload.params, **(overrides or {})}}).openai_kwargs()
        body = {"model": self.model, "messages": workload.openai_messages(), "stream": True,
                "stream_options": {"include_usage": True}, **kwargs.pop("extra_body", {}), **kwargs}
        return json.dumps(body).encode()

    async def send(self, workload: Workload, overrides: dict[str, Any] | None = None) -> RequestRecord:
        """Send one streamed request; TTFT is the first event whose delta carries text."""
        content = self.body(workload, overrides)
        headers = {"content-type": "application/json"}
        start = time.perf_counter()
        ttft: float | None = None
        usage: dict[str, Any] | None = None
        buffer = bytearray()
        try:
            async with self._client.stream("POST", self._url, content=content, headers=headers) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                async for data in resp.aiter_raw():
                    for payload in sse_payloads(buffer, data):
                        if payload == b"[DONE]":
                            continue
                        event = _loads(payload)
                        if "error" in event:
                            raise RuntimeError(f"error event: {str(event['error'])[:200]}")
                        if event.get("usage"):
                            usage = event["usage"]
                        if ttft is None:
                            for choice in event.get("choices") or ():
                                delta = choice.get("delta") or {}
                                if delta.get("content") or delta.get("reasoning_content"):
                                    ttft = time.perf_counter() - start
                                    break
            e2e = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 — a failed request is a data point, not a crash
            return _failed(start, exc)
        tokens = None if usage is None else (int(usage["completion_tokens"]), int(usage["prompt_tokens"]))
        return _streamed_record(start, e2e, ttft, tokens)


def _bytes_input(name: str, values: list[bytes]) -> Any:
    import tritonclient.grpc.aio as grpcclient

    arr = np.empty(len(values), dtype=np.object_)
    arr[:] = values
    inp = grpcclient.InferInput(name, [len(values)], "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


class TritonClient:
    """Streams from the `nemovl` entry model over gRPC (one channel; one bidirectional stream per request)."""

    def __init__(self, url: str, model: str = ENTRY_MODEL) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.model = model
        self._client = grpcclient.InferenceServerClient(url=url)

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self._client.close()

    def inputs(self, workload: Workload, overrides: dict[str, Any] | None = None) -> list[Any]:
        """The entry model's input tensors for `workload` (optional inputs only when used)."""
        params = {**workload.params, **(overrides or {})}
        inputs = [_bytes_input("messages", [json.dumps(workload.triton_messages()).encode()])]
        if workload.images:
            inputs.append(_bytes_input("images", list(workload.images)))
        if workload.video is not None:
            inputs.append(_bytes_input("video", [workload.video]))
        if params:
            inputs.append(_bytes_input("params", [json.dumps(params).encode()]))
        return inputs

    async def send(self, workload: Workload, overrides: dict[str, Any] | None = None) -> RequestRecord:
        """Send one request and read its responses until the one with a finish_reason."""
        inputs = self.inputs(workload, overrides)
        request = {"model_name": self.model, "inputs": inputs}

        async def requests():
            yield request

        start = time.perf_counter()
        ttft: float | None = None
        completion = 0
        prompt: int | None = None
        info: str = ""
        responses = 0
        try:
            stream = self._client.stream_infer(requests())
            async for result, error in stream:
                if error is not None:
                    raise RuntimeError(str(error))
                responses += 1
                token_ids = result.as_numpy("token_ids")
                if ttft is None and token_ids is not None and token_ids.size > 0:
                    ttft = time.perf_counter() - start
                ct = result.as_numpy("completion_tokens")
                if ct is not None and ct.size:
                    completion = int(ct.reshape(-1)[0])
                pt = result.as_numpy("prompt_tokens")
                if prompt is None and pt is not None and pt.size:
                    prompt = int(pt.reshape(-1)[0])
                inf = result.as_numpy("info")
                if not info and inf is not None and inf.size:
                    raw = inf.reshape(-1)[0]
                    info = raw.decode() if isinstance(raw, bytes) else str(raw)
                fr = result.as_numpy("finish_reason")
                if fr is not None and fr.size and fr.reshape(-1)[0]:
                    break
            e2e = time.perf_counter() - start
            if hasattr(stream, "cancel"):
                stream.cancel()
        except Exception as exc:  # noqa: BLE001 — a failed request is a data point, not a crash
            return _failed(start, exc)
        extra: dict[str, Any] = {"responses": responses}
        if info:
            try:
                extra["info"] = json.loads(info)
            except ValueError:
                extra["info"] = info
        return RequestRecord(ok=True, start_s=start, e2e_s=e2e, ttft_s=ttft, completion_tokens=completion,
                             prompt_tokens=prompt, extra=extra)
