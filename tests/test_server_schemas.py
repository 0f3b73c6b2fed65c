"""Request validation: OpenAI fields and NIM extensions → ChatRequest, or a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.schemas import ModelLimits, parse_chat_request

LIMITS = ModelLimits(max_seq_len=4096, max_images=4, max_num_tiles=12, max_video_frames=128)
IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
VID = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    b.update(kw)
    return b


def bad(b: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as e:
        parse_chat_request(b, LIMITS)
    assert e.value.status == 400
    return e.value


def test_media_parts_become_indices() -> None:
    r = parse_chat_request(body(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, IMG, IMG]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [IMG, {"type": "image_url", "image_url": "https://e.com/x.png"}]},
    ]), LIMITS)
    assert r.messages[1]["content"] == [{"type": "text", "text": "compare"}, {"type": "image", "index": 0},
                                        {"type": "image", "index": 1}]
    assert r.messages[3]["content"] == [{"type": "image", "index": 2}, {"type": "image", "index": 3}]
    assert [i.url for i in r.images][-1] == "https://e.com/x.png"
    assert r.images[2].param == "messages[3].content[0].image_url"
    assert r.video is None and r.params == {} and r.tools is None and not r.stream


def test_video_part() -> None:
    r = parse_chat_request(body(messages=[{"role": "user", "content": [VID, {"type": "text", "text": "?"}]}],
                                media_io_kwargs={"video": {"fps": 1.5}}, video_pruning_rate=0.5), LIMITS)
    assert r.messages[0]["content"][0] == {"type": "video", "index": 0}
    assert r.video is not None and r.video.kind == "video"
    assert r.params == {"fps": 1.5, "video_pruning_rate": 0.5}


def test_sampling_fields_forwarded() -> None:
    r = parse_chat_request(body(temperature=0.7, top_p=0.9, top_k=20, seed=7, stop="END", max_tokens=50,
                                max_completion_tokens=30, frequency_penalty=0, presence_penalty=0.0, n=1,
                                logprobs=False, response_format={"type": "text"},
                                mm_processor_kwargs={"max_num_tiles": 6}, ignore_eos=True), LIMITS)
    assert r.params == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 7, "stop": ["END"],
                        "max_tokens": 30, "max_num_tiles": 6, "ignore_eos": True}


def test_sampling_extensions_forwarded() -> None:
    r = parse_chat_request(body(n=3, frequency_penalty=0.5, presence_penalty=-0.25, repetition_penalty=1.2,
                                logit_bias={"17": -100, "3": 2.5}, logprobs=True, top_logprobs=4, seed=1), LIMITS)
    assert r.params == {"n": 3, "frequency_penalty": 0.5, "presence_penalty": -0.25, "repetition_penalty": 1.2,
                        "logit_bias": {"17": -100.0, "3": 2.5}, "logprobs": 4, "seed": 1}
    assert r.sampling.n == 3 and r.sampling.logprobs == 4
    r = parse_chat_request(body(logprobs=True), LIMITS)
    assert r.params == {"logprobs": 0} and r.sampling.logprobs == 0
    assert parse_chat_request(body(logprobs=False, top_logprobs=0), LIMITS).sampling.logprobs is None


def test_response_format_and_forced_tools_become_grammar_specs() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    r = parse_chat_request(body(response_format={"type": "json_schema", "json_schema": {
        "name": "A", "schema": schema, "strict": True}}), LIMITS)
    assert r.params["guided"] == {"type": "json_schema", "schema": schema, "strict": True}
    assert parse_chat_request(body(response_format={"type": "json_object"}), LIMITS).params["guided"] == {
        "type": "json_object"}
    assert "guided" not in parse_chat_request(body(response_format={"type": "text"}), LIMITS).params
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}},
             {"type": "function", "function": {"name": "g", "strict": True}}]
    r = parse_chat_request(body(tools=tools, tool_choice="required"), LIMITS)
    assert r.params["guided"] == {"type": "tool_calls", "parallel": True, "tools": [
        {"name": "f", "parameters": schema, "strict": False}, {"name": "g", "parameters": None, "strict": True}]}
    r = parse_chat_request(body(tools=tools, tool_choice="required", parallel_tool_calls=False), LIMITS)
    assert r.params["guided"]["parallel"] is False
    r = parse_chat_request(body(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}), LIMITS)
    assert r.params["guided"]["tools"] == [{"name": "g", "parameters": None, "strict": True}]
    assert "guided" not in parse_chat_request(body(tools=tools, tool_choice="auto"), LIMITS).params


def test_stream_options() -> None:
    r = parse_chat_request(body(stream=True, stream_options={"include_usage": True}), LIMITS)
    assert r.stream and r.include_usage
    assert bad(body(stream_options={"include_usage": True})).param == "stream_options"
    assert bad(body(stream=False, stream_options={"include_usage": True})).param == "stream_options"


def test_tools_and_tool_choice() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "get_time"}}]
    r = parse_chat_request(body(tools=tools), LIMITS)
    assert r.tools == tools and r.parse_tools
    r = parse_chat_request(body(tools=tools, tool_choice="none"), LIMITS)
    assert r.tools is None and not r.parse_tools
    r = parse_chat_request(body(tools=tools, tool_choice="required"), LIMITS)
    assert r.tools == tools and r.parse_tools
    r = parse_chat_request(body(tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}}),
                           LIMITS)
    assert r.tools == [tools[1]]
    assert bad(body(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})).param == "tool_choice"
    assert bad(body(tools=[{"type": "function", "function": {"name": "has space"}}])).param == "tools[0].function.name"
    assert bad(body(tool_choice="required")).param == "tool_choice"


def test_assistant_tool_call_history_is_forwarded() -> None:
    call = {"id": "call_123456789", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    r = parse_chat_request(body(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_123456789", "content": "42"},
    ]), LIMITS)
    assert r.messages[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert r.messages[2] == {"role": "tool", "tool_call_id": "call_123456789", "content": "42"}


@pytest.mark.parametrize(("system", "expected"), [
    (None, False), ("/think", True), ("/no_think", False), ("/think then /no_think", False),
    ("/no_think then /think", True),
])
def test_reasoning_hint(system: str | None, expected: bool) -> None:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "q"}]
    assert parse_chat_request(body(messages=msgs), LIMITS).reasoning_hint is expected


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"temperature": 2.5}, "temperature", "invalid_parameter"),
    ({"temperature": -0.1}, "temperature", "invalid_parameter"),
    ({"temperature": "hot"}, "temperature", "invalid_parameter"),
    ({"top_p": 0}, "top_p", "invalid_parameter"),
    ({"top_p": 1.01}, "top_p", "invalid_parameter"),
    ({"top_k": -2}, "top_k", "invalid_parameter"),
    ({"top_k": 1.5}, "top_k", "invalid_parameter"),
    ({"seed": "x"}, "seed", "invalid_parameter"),
    ({"max_tokens": 0}, "max_tokens", "invalid_parameter"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", "invalid_parameter"),
    ({"max_tokens": 4096}, "max_tokens", "context_length_exceeded"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens", "context_length_exceeded"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "invalid_parameter"),
    ({"presence_penalty": -2.5}, "presence_penalty", "invalid_parameter"),
    ({"repetition_penalty": 0}, "repetition_penalty", "invalid_parameter"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_parameter"),
    ({"logit_bias": {"five": 1}}, "logit_bias", "invalid_parameter"),
    ({"logit_bias": [1, 2]}, "logit_bias", "invalid_parameter"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_parameter"),
    ({"stop": [1]}, "stop", "invalid_parameter"),
    ({"n": 9}, "n", "invalid_parameter"),
    ({"n": 0}, "n", "invalid_parameter"),
    ({"logprobs": "yes"}, "logprobs", "invalid_parameter"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "invalid_parameter"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "string", "colour": 1}}}}}},
     "response_format.json_schema.schema", "invalid_json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema", "invalid_json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(("}}}}, "response_format.json_schema.schema",
     "invalid_json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "invalid_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "response_format.json_schema.schema",
     "invalid_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}],
      "tool_choice": "required"}, "tools", "invalid_json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format", "invalid_parameter"),
    ({"response_format": {"type": "yaml"}}, "response_format", "invalid_parameter"),
    ({"stream": "yes"}, "stream", "invalid_parameter"),
    ({"mm_processor_kwargs": {"max_num_tiles": 0}}, "mm_processor_kwargs.max_num_tiles", "invalid_parameter"),
    ({"mm_processor_kwargs": {"max_num_tiles": 13}}, "mm_processor_kwargs.max_num_tiles", "invalid_parameter"),
    ({"mm_processor_kwargs": {"tiles": 3}}, "mm_processor_kwargs", "invalid_parameter"),
    ({"media_io_kwargs": {"video": {"fps": 2, "num_frames": 8}}}, "media_io_kwargs.video", "invalid_video_sampling"),
    ({"media_io_kwargs": {"video": {"fps": 0}}}, "media_io_kwargs.video.fps", "invalid_parameter"),
    ({"media_io_kwargs": {"video": {"num_frames": 129}}}, "media_io_kwargs.video.num_frames", "invalid_parameter"),
    ({"media_io_kwargs": {"video": {"speed": 2}}}, "media_io_kwargs.video", "invalid_parameter"),
    ({"video_pruning_rate": 1.0}, "video_pruning_rate", "invalid_parameter"),
    ({"video_pruning_rate": -0.1}, "video_pruning_rate", "invalid_parameter"),
    ({"model": 3}, "model", "invalid_parameter"),
    ({"messages": []}, "messages", "invalid_parameter"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_parameter"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url"}]}]}, "messages[0].content[0].type",
     "unsupported_content_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": [VID, VID]}]}, "messages[0].content[1].video_url", "too_many_videos"),
    ({"messages": [{"role": "user", "content": [IMG, VID]}]}, "messages[0].content[1].video_url", "video_with_images"),
    ({"messages": [{"role": "user", "content": [IMG] * 5}]}, "messages[0].content[4].image_url", "too_many_images"),
])
def test_rejections(fields: dict[str, Any], param: str, code: str) -> None:
    e = bad(body(**fields))
    assert (e.param, e.code) == (param, code)
    env = e.to_dict()
    assert set(env) == {"error"} and set(env["error"]) == {"message", "type", "param", "code"}
    assert env["error"]["type"] == "invalid_request_error" and env["error"]["message"].endswith(".")


def test_image_limit_comes_from_model_limits() -> None:
    two = ModelLimits(max_seq_len=None, max_images=2, max_num_tiles=12, max_video_frames=128)
    parse_chat_request(body(messages=[{"role": "user", "content": [IMG, IMG]}]), two)
    with pytest.raises(APIError) as e:
        parse_chat_request(body(messages=[{"role": "user", "content": [IMG, IMG, IMG]}]), two)
    assert e.value.code == "too_many_images" and "At most 2 images" in e.value.message
