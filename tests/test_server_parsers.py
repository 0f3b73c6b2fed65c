"""Output parsers of the frontend: <think> splitting, <TOOLCALL> extraction, SSE framing, metrics."""

from __future__ import annotations

import json

import pytest

from nemovl_trt.server.metrics import Metrics
from nemovl_trt.server.reasoning import ReasoningSplitter, split_reasoning
from nemovl_trt.server.streaming import SSE_DONE, Final, OutputAssembler, chunk, dumps, sse
from nemovl_trt.server.textscan import safe_prefix_len
from nemovl_trt.server.tools import ToolCallExtractor, new_tool_call_id, parse_tool_block


def _chunked(text: str, reasoning: bool, cuts: list[int]) -> tuple[str, str]:
    s = ReasoningSplitter(reasoning)
    r, c, prev = [], [], 0
    for cut in [*cuts, len(text)]:
        a, b = s.feed(text[prev:cut])
        r.append(a)
        c.append(b)
        prev = cut
    a, b = s.finish()
    return "".join(r) + a, "".join(c) + b


@pytest.mark.parametrize(("text", "reasoning", "expected"), [
    ("<think>\nplan it\n</think>\n\nThe answer.", False, ("plan it", "The answer.")),
    ("<think>plan</think>answer", True, ("plan", "answer")),
    ("plan only\n</think>\nanswer", True, ("plan only", "answer")),  # prompt ended with <think>
    ("just an answer", False, ("", "just an answer")),
    ("<think>cut by max_tokens", True, ("cut by max_tokens", "")),
    ("<think>never closed but it was the answer", False, ("", "never closed but it was the answer")),
    ("", True, ("", "")),
    ("a <think> in the middle", False, ("", "a <think> in the middle")),
])
def test_split_reasoning(text: str, reasoning: bool, expected: tuple[str, str]) -> None:
    assert split_reasoning(text, reasoning) == expected


@pytest.mark.parametrize("reasoning", [False, True])
@pytest.mark.parametrize("text", [
    "<think>\nstep one\nstep two\n</think>\n\nfinal answer here",
    "no tags at all, a plain answer",
    "<think>unclosed thinking text",
    "thinking </think> answer",
])
def test_reasoning_split_is_chunking_invariant(text: str, reasoning: bool) -> None:
    whole = split_reasoning(text, reasoning)
    for i in range(len(text) + 1):
        assert _chunked(text, reasoning, [i]) == whole, i
    assert _chunked(text, reasoning, list(range(1, len(text)))) == whole


def test_safe_prefix_len() -> None:
    assert safe_prefix_len("abc<thi", ("<think>",)) == 3
    assert safe_prefix_len("abc<", ("<think>", "</think>")) == 3
    assert safe_prefix_len("abc", ("<think>",)) == 3
    assert safe_prefix_len("<think>", ("<think>",)) == 7  # a whole tag is not a *proper* prefix


def test_tool_block_parsing() -> None:
    calls = parse_tool_block('[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]')
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 2}
    assert parse_tool_block('{"name": "f", "arguments": "{\\"a\\": 1}"}') == [{"name": "f", "arguments": '{"a": 1}'}]
    assert parse_tool_block("[{\"name\": 3}]") is None
    assert parse_tool_block("not json") is None
    assert parse_tool_block("[]") is None


def test_tool_call_ids() -> None:
    ids = {new_tool_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(isinstance(i, str) and len(i) >= 9 for i in ids)


def _extract_all(text: str, step: int) -> tuple[str, list[dict]]:
    ex = ToolCallExtractor(True)
    out, calls = [], []
    for i in range(0, len(text), step):
        t, c = ex.feed(text[i:i + step])
        out.append(t)
        calls += c
    t, c = ex.finish()
    return "".join(out) + t, calls + c


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_tool_extractor_streaming(step: int) -> None:
    text = ('Sure.<TOOLCALL>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</TOOLCALL>'
            '<TOOLCALL>[{"name": "c", "arguments": {"y": "z"}}]</TOOLCALL>')
    rest, calls = _extract_all(text, step)
    assert rest == "Sure."
    assert [c["function"]["name"] for c in calls] == ["a", "b", "c"]
    assert [c["index"] for c in calls] == [0, 1, 2]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    assert all(c["type"] == "function" and len(c["id"]) >= 9 for c in calls)


def test_tool_extractor_keeps_malformed_and_unclosed() -> None:
    assert _extract_all("x<TOOLCALL>oops</TOOLCALL>y", 2) == ("x<TOOLCALL>oops</TOOLCALL>y", [])
    rest, calls = _extract_all('<TOOLCALL>[{"name": "f", "arguments": {}}]', 4)  # stopped before the close tag
    assert rest == "" and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    assert _extract_all("<TOOLCALL>[{\"name\": \"f\"", 4) == ("<TOOLCALL>[{\"name\": \"f\"", [])
    ex = ToolCallExtractor(False)
    assert ex.feed("<TOOLCALL>[]</TOOLCALL>") == ("<TOOLCALL>[]</TOOLCALL>", [])


def test_assembler_unclosed_think_does_not_hide_tool_call() -> None:
    asm = OutputAssembler(reasoning=True, parse_tools=True)
    asm.feed('<think>I should call it <TOOLCALL>[{"name": "f", "arguments": {"q": 1}}]</TOOLCALL>')
    asm.finish()
    msg = asm.message()
    assert msg["tool_calls"][0]["function"]["name"] == "f"
    assert msg["reasoning_content"] == "I should call it"
    assert asm.finish_reason("stop") == "tool_calls"
    assert asm.finish_reason("length") == "length"


def test_assembler_message_shape() -> None:
    asm = OutputAssembler(reasoning=False, parse_tools=False)
    assert asm.feed("Hello") == {"content": "Hello"}
    assert asm.feed(" world") == {"content": " world"}
    assert asm.finish() == {}
    assert asm.message() == {"role": "assistant", "content": "Hello world", "reasoning_content": None}
    assert asm.finish_reason("stop") == "stop"


def test_sse_framing() -> None:
    c = chunk("chatcmpl-1", 123, "m", {"content": "hé"}, None)
    frame = sse(c)
    assert frame.startswith(b"data: {") and frame.endswith(b"}\n\n") and frame.count(b"\n") == 2
    assert json.loads(frame[6:]) == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 123,
                                     "model": "m", "choices": [{"index": 0, "delta": {"content": "hé"},
                                                                "logprobs": None, "finish_reason": None}]}
    usage = chunk("chatcmpl-1", 123, "m", None, usage={"prompt_tokens": 1})
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 1}
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_metrics_render_and_info() -> None:
    m = Metrics()
    m.requests.labels(status="200").inc()
    m.observe_info({"images": 2, "tiles": [3, 7], "frames": 0, "evs_pruned_tokens": 5, "warnings": []})
    text = m.render().decode()
    assert 'nemovl_requests_total{status="200"} 1.0' in text
    assert "nemovl_images_total 2.0" in text
    assert "nemovl_image_tiles_total 10.0" in text
    assert "nemovl_evs_pruned_tokens_total 5.0" in text
    assert "nemovl_video_frames_total 0.0" in text
    for name in ("nemovl_request_latency_seconds_bucket", "nemovl_time_to_first_token_seconds_bucket",
                 "nemovl_inter_token_latency_seconds_bucket", "nemovl_queue_depth", "nemovl_requests_in_flight",
                 "nemovl_prompt_tokens_total", "nemovl_completion_tokens_total"):
        assert name in text, name


# ------------------------------------------------------------------ JSON rendering (orjson when exact)
def test_dumps_gives_the_json_modules_document() -> None:
    obj = chunk("chatcmpl-1", 7, "m", {"content": "café 😀 \u2028 \"q\" \\"}, "stop", index=2,
                warnings=["w"])
    out = dumps(obj)
    assert out == json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()  # byte for byte
    assert "café 😀".encode() in out  # UTF-8, not \\u escapes
    assert sse(obj) == b"data: " + out + b"\n\n"


def test_dumps_keeps_non_finite_logprobs_and_odd_values_readable() -> None:
    lp = {"content": [{"token": "a", "logprob": float("-inf"), "bytes": [97], "top_logprobs": []}]}
    out = dumps(chunk("c", 1, "m", {"content": "a"}, logprobs=lp))
    assert b'"logprob":-Infinity' in out  # as json writes it (orjson would write null, which clients reject)
    assert json.loads(dumps({"big": 2 ** 70}))["big"] == 2 ** 70  # beyond orjson's 64 bits
    assert json.loads(dumps({"s": "x\ud800"}))["s"] == "x\ud800"  # a lone surrogate is escaped, not a crash
    assert json.loads(dumps({1: "non-string key"})) == {"1": "non-string key"}


def test_final_piece_is_bytes() -> None:
    piece = Final(b"data: {}\n\n")
    assert isinstance(piece, bytes) and piece + SSE_DONE == b"data: {}\n\n" + SSE_DONE
