"""Validation of `/v1/chat/completions` bodies (OpenAI fields + NIM extensions) into a `ChatRequest`.

Every rejection is a 400 APIError in the OpenAI envelope naming the offending `param`. Limits that the
model defines (max images, tiles, frames, context) come from Triton's `nemovl` model-config parameters
(`ModelLimits`), never from constants here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from nemovl_trt.server.errors import APIError, invalid
from nemovl_trt.server.fields import boolean, integer, number, request_model
from nemovl_trt.server.response_format import response_format_spec, tool_call_spec
from nemovl_trt.server.sampling_schema import (
    MAX_N,
    MAX_STOP,
    MAX_TOP_LOGPROBS,
    Limits,
    Sampling,
    parse_sampling,
)

ROLES = ("system", "developer", "user", "assistant", "tool")
__all__ = ["MAX_N", "MAX_STOP", "MAX_TOP_LOGPROBS", "ChatRequest", "MediaRef", "ModelLimits", "parse_chat_request"]
_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class ModelLimits:
    """Limits of the served model, read from Triton's `nemovl` config parameters."""

    max_seq_len: int | None
    max_images: int
    max_num_tiles: int
    max_video_frames: int


@dataclass(frozen=True)
class MediaRef:
    """One media part: `kind` "image"/"video", its URL/data string, and where it was in the body."""

    kind: str
    url: str
    param: str


@dataclass
class ChatRequest:
    """A validated chat request. `messages` already reference media by index (nemovl form)."""

    model: str
    messages: list[dict[str, Any]]
    images: list[MediaRef]
    video: MediaRef | None
    params: dict[str, Any]  # → Triton `params` (JSON)
    tools: list[dict[str, Any]] | None  # → Triton `tools` (None: none sent)
    parse_tools: bool  # whether the output is scanned for tool calls
    stream: bool = False
    include_usage: bool = False
    reasoning_hint: bool = False  # /think requested (last of /think, /no_think in system prompts)
    extra: dict[str, Any] = field(default_factory=dict)
    sampling: Sampling = field(default_factory=Sampling)  # n, logprobs, stream flags


_number, _integer, _bool = number, integer, boolean


def _media_url(part: dict, key: str, param: str) -> str:
    ref = part.get(key)
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict) and isinstance(ref.get("url"), str):
        return ref["url"]
    raise invalid(f"'{param}.{key}' must be an object with a string 'url'.", f"{param}.{key}")


def _convert_content(content: Any, param: str, images: list[MediaRef], videos: list[MediaRef]) -> Any:
    """Content string/list → nemovl content with media parts replaced by index references."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or a list of content parts.", param)
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pp = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"'{pp}' must be an object with a 'type'.", pp)
        typ = part["type"]
        if typ == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"'{pp}.text' must be a string.", f"{pp}.text")
            out.append({"type": "text", "text": part["text"]})
        elif typ in ("image_url", "input_image"):
            images.append(MediaRef("image", _media_url(part, "image_url", pp), f"{pp}.image_url"))
            out.append({"type": "image", "index": len(images) - 1})
        elif typ == "video_url":
            videos.append(MediaRef("video", _media_url(part, "video_url", pp), f"{pp}.video_url"))
            out.append({"type": "video", "index": len(videos) - 1})
        else:
            raise APIError(400, f"Content part type '{typ}' is not supported (text, image_url, video_url).",
                           code="unsupported_content_type", param=f"{pp}.type")
    return out


def _reasoning_requested(messages: list[dict[str, Any]]) -> bool:
    """Fallback when Triton's `info` does not say: the last `/think` / `/no_think` in system and user
    messages wins; default off (docs/api.md "Reasoning")."""
    state = False
    for m in messages:
        if m.get("role") not in ("system", "user"):
            continue
        c = m.get("content")
        text = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
        for tok in re.findall(r"/no_think|/think", text):
            state = tok == "/think"
    return state


def _validate_tools(body: dict) -> tuple[list[dict[str, Any]] | None, bool]:
    """(tools sent to the template, whether the output is parsed for calls)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools'.", "tool_choice")
        return None, False
    if not isinstance(tools, list) or not tools:
        raise invalid("'tools' must be a non-empty list.", "tools")
    names = []
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise invalid(f"'{p}' must be {{'type': 'function', 'function': {{...}}}}.", p)
        name = t["function"].get("name")
        if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
            raise invalid(f"'{p}.function.name' must be 1-64 letters, digits, '_', '.' or '-'.", f"{p}.function.name")
        params = t["function"].get("parameters")
        if params is not None and not isinstance(params, dict):
            raise invalid(f"'{p}.function.parameters' must be a JSON Schema object.", f"{p}.function.parameters")
        names.append(name)
    if choice is None or choice in ("auto", "required"):
        return tools, True
    if choice == "none":
        return None, False
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise invalid(f"'tool_choice' names the function '{name}', which is not in 'tools'.", "tool_choice")
        return [t for t in tools if t["function"]["name"] == name], True
    raise invalid("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.",
                  "tool_choice")


def _nim_extensions(body: dict, limits: ModelLimits, params: dict[str, Any]) -> None:
    mio = body.get("media_io_kwargs")
    if mio is not None:
        if not isinstance(mio, dict):
            raise invalid("'media_io_kwargs' must be an object.", "media_io_kwargs")
        video = mio.get("video", {})
        if not isinstance(video, dict):
            raise invalid("'media_io_kwargs.video' must be an object.", "media_io_kwargs.video")
        unknown = set(video) - {"fps", "num_frames"}
        if unknown:
            raise invalid(f"'media_io_kwargs.video' accepts only 'fps' or 'num_frames', not {sorted(unknown)}.",
                          "media_io_kwargs.video")
        if "fps" in video and "num_frames" in video:
            raise invalid("'media_io_kwargs.video' takes 'fps' or 'num_frames', not both.", "media_io_kwargs.video",
                          code="invalid_video_sampling")
        fps = _number(video, "fps", 0, math.inf, lo_open=True, param="media_io_kwargs.video.fps")
        nf = _integer(video, "num_frames", 1, limits.max_video_frames, param="media_io_kwargs.video.num_frames")
        if fps is not None:
            params["fps"] = fps
        if nf is not None:
            params["num_frames"] = nf
    mpk = body.get("mm_processor_kwargs")
    if mpk is not None:
        if not isinstance(mpk, dict):
            raise invalid("'mm_processor_kwargs' must be an object.", "mm_processor_kwargs")
        unknown = set(mpk) - {"max_num_tiles"}
        if unknown:
            raise invalid(f"'mm_processor_kwargs' accepts only 'max_num_tiles', not {sorted(unknown)}.",
                          "mm_processor_kwargs")
        k = _integer(mpk, "max_num_tiles", 1, limits.max_num_tiles, param="mm_processor_kwargs.max_num_tiles")
        if k is not None:
            params["max_num_tiles"] = k
    q = _number(body, "video_pruning_rate", 0.0, 1.0, hi_open=True)
    if q is not None:
        params["video_pruning_rate"] = q


def parse_chat_request(body: Any, limits: ModelLimits) -> ChatRequest:
    """Validate a decoded JSON body. Raises APIError(400) naming the bad field."""
    model = request_model(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("'messages' must be a non-empty list.", "messages")

    images: list[MediaRef] = []
    videos: list[MediaRef] = []
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"'{p}' must be an object.", p)
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"'{p}.role' must be one of {', '.join(ROLES)}.", f"{p}.role")
        if "content" not in m and not (role == "assistant" and m.get("tool_calls")):
            raise invalid(f"'{p}.content' is required.", f"{p}.content")
        if m.get("content") is None and role != "assistant":
            raise invalid(f"'{p}.content' must not be null.", f"{p}.content")
        out = {k: v for k, v in m.items() if k in ("role", "name", "tool_calls", "tool_call_id")}
        out["role"] = "system" if role == "developer" else role
        out["content"] = _convert_content(m.get("content"), f"{p}.content", images, videos)
        messages.append(out)

    if len(videos) > 1:
        raise invalid("Only one video per request is supported.", videos[1].param, code="too_many_videos")
    if videos and images:
        raise invalid("A request may contain one video or images, not both.", videos[0].param,
                      code="video_with_images")
    if len(images) > limits.max_images:
        raise invalid(f"At most {limits.max_images} images per request are supported; got {len(images)}.",
                      images[limits.max_images].param, code="too_many_images")

    params: dict[str, Any] = {}
    sampling = parse_sampling(body, Limits(limits.max_seq_len), params, chat=True)
    _bool(body, "parallel_tool_calls")
    tools, parse_tools = _validate_tools(body)
    guided = response_format_spec(body)
    forced = tool_call_spec(tools, body.get("tool_choice"), body.get("parallel_tool_calls")) if tools else None
    if guided is not None and forced is not None:
        raise invalid("'response_format' and a forced tool call ('tool_choice' required or named) cannot be "
                      "combined.", "response_format")
    if guided or forced:
        params["guided"] = guided or forced
    _nim_extensions(body, limits, params)
    return ChatRequest(model=model, messages=messages, images=images, video=videos[0] if videos else None,
                       params=params, tools=tools, parse_tools=parse_tools, stream=sampling.stream,
                       include_usage=sampling.include_usage,
                       reasoning_hint=_reasoning_requested(messages) and not videos, sampling=sampling)
