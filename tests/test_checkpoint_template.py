"""The chat template renders the Nemotron format of docs/model.md §5.3 exactly (expected strings written by hand)."""

from __future__ import annotations

import pytest

from nemovl_trt.checkpoint.tokenizer import default_chat_template, render_chat

T = default_chat_template()
GEN_ON = "<SPECIAL_11>Assistant\n<think>\n"
GEN_OFF = "<SPECIAL_11>Assistant\n<think></think>"


def r(messages, **kw) -> str:
    return render_chat(T, messages, **kw)


def test_system_and_user():
    msgs = [{"role": "system", "content": "  You are a helpful assistant.  "},
            {"role": "user", "content": "How many red squares?"}]
    assert r(msgs) == ("<SPECIAL_10>System\nYou are a helpful assistant.\n"
                       "<SPECIAL_11>User\nHow many red squares?\n" + GEN_ON)


def test_system_block_is_always_emitted():
    assert r([{"role": "user", "content": "Hi"}]) == "<SPECIAL_10>System\n\n<SPECIAL_11>User\nHi\n" + GEN_ON


def test_no_generation_prompt():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert r(msgs, add_generation_prompt=False) == (
        "<SPECIAL_10>System\n\n<SPECIAL_11>User\nHi\n<SPECIAL_11>Assistant\nHello.\n<SPECIAL_12>\n")


def test_multi_turn_assistant_keeps_text_after_think():
    msgs = [{"role": "user", "content": "Which shape is blue?"},
            {"role": "assistant", "content": "<think>\nThe circle is blue.\n</think>\n\nThe circle."},
            {"role": "user", "content": "And the red one?"}]
    assert r(msgs) == ("<SPECIAL_10>System\n\n<SPECIAL_11>User\nWhich shape is blue?\n"
                       "<SPECIAL_11>Assistant\nThe circle.\n<SPECIAL_12>\n"
                       "<SPECIAL_11>User\nAnd the red one?\n" + GEN_ON)


@pytest.mark.parametrize(("system", "users", "expected_gen"), [
    (None, ["plain"], GEN_ON),  # default: reasoning on (docs/model.md §5.3)
    ("/no_think", ["plain"], GEN_OFF),
    ("/no_think", ["question /think"], GEN_ON),  # user after system wins
    ("/think", ["question /no_think"], GEN_OFF),
    ("/think", ["first /no_think", "second"], GEN_OFF),  # a later turn without a flag keeps the last flag
    (None, ["/no_think then /think"], GEN_ON),  # within one message the last occurrence wins
    (None, ["/think then /no_think"], GEN_OFF),
])
def test_think_flags_last_occurrence_wins(system, users, expected_gen):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for i, u in enumerate(users):
        msgs.append({"role": "user", "content": u})
        if i < len(users) - 1:
            msgs.append({"role": "assistant", "content": "ok"})
    out = r(msgs)
    assert out.endswith(expected_gen)
    body = out[: -len(expected_gen)]
    assert "/think" not in body and "/no_think" not in body


def test_flags_are_removed_and_stripped():
    msgs = [{"role": "system", "content": "/think Be brief."}, {"role": "user", "content": "Count /no_think"}]
    assert r(msgs) == "<SPECIAL_10>System\nBe brief.\n<SPECIAL_11>User\nCount\n" + GEN_OFF


def test_image_parts_become_placeholders_in_place():
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image", "index": 0},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Which is red?"}]}]
    assert r(msgs) == ("<SPECIAL_10>System\n\n<SPECIAL_11>User\nCompare\n<image>\n<image>\nWhich is red?\n"
                       + GEN_ON)


def test_video_part_then_text():
    msgs = [{"role": "system", "content": "Watch closely."},
            {"role": "user", "content": [{"type": "video", "index": 0}, {"type": "text", "text": "What moves?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The circle."}]},
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]
    assert r(msgs) == ("<SPECIAL_10>System\nWatch closely.\n<SPECIAL_11>User\n<video>\nWhat moves?\n"
                       "<SPECIAL_11>Assistant\nThe circle.\n<SPECIAL_12>\n<SPECIAL_11>User\n<video>\n" + GEN_ON)


TOOLS = [{"type": "function", "function": {
    "name": "count_shapes", "description": "Count shapes of a colour.",
    "parameters": {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}}}]
TOOLS_TEXT = (
    "You can use the following tools to assist the user if required:\n"
    '<AVAILABLE_TOOLS>[{"name": "count_shapes", "description": "Count shapes of a colour.", "parameters": '
    '{"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}}]'
    "</AVAILABLE_TOOLS>\n\n"
    "If you decide to call any tool(s), use the following format:\n"
    '<TOOLCALL>[{"name": "tool_name", "arguments": {"arg": "value"}}]</TOOLCALL>\n\n'
    "The user will execute the tool calls and return their responses in this format:\n"
    "<TOOL_RESPONSE>[tool_response1, tool_response2]</TOOL_RESPONSE>")


def test_tools_listed_in_system_block():
    msgs = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "How many red?"}]
    assert r(msgs, tools=TOOLS) == ("<SPECIAL_10>System\nBe exact.\n\n" + TOOLS_TEXT + "\n"
                                    "<SPECIAL_11>User\nHow many red?\n" + GEN_ON)
    # without a system message the tool text starts the (always present) System block
    assert r(msgs[1:], tools=TOOLS).startswith("<SPECIAL_10>System\n" + TOOLS_TEXT + "\n<SPECIAL_11>User\n")


def test_tool_calls_and_grouped_tool_responses():
    msgs = [{"role": "user", "content": "Count red and blue."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_000000001", "type": "function",
                 "function": {"name": "count_shapes", "arguments": '{"colour": "red"}'}},
                {"id": "call_000000002", "type": "function",
                 "function": {"name": "count_shapes", "arguments": {"colour": "blue"}}}]},
            {"role": "tool", "tool_call_id": "call_000000001", "content": "3"},
            {"role": "tool", "tool_call_id": "call_000000002", "content": '{"count": 1}'},
            {"role": "assistant", "content": "<think>3 and 1</think>Three red, one blue.", "tool_calls": [
                {"type": "function", "function": {"name": "count_shapes", "arguments": "{}"}}]}]
    assert r(msgs, tools=TOOLS, add_generation_prompt=False) == (
        "<SPECIAL_10>System\n" + TOOLS_TEXT + "\n"
        "<SPECIAL_11>User\nCount red and blue.\n"
        '<SPECIAL_11>Assistant\n<TOOLCALL>[{"name": "count_shapes", "arguments": {"colour": "red"}}, '
        '{"name": "count_shapes", "arguments": {"colour": "blue"}}]</TOOLCALL>\n<SPECIAL_12>\n'
        '<SPECIAL_11>User\n<TOOL_RESPONSE>[3, {"count": 1}]</TOOL_RESPONSE>\n'
        '<SPECIAL_11>Assistant\nThree red, one blue.\n<TOOLCALL>[{"name": "count_shapes", "arguments": {}}]'
        "</TOOLCALL>\n<SPECIAL_12>\n")


def test_non_ascii_json_is_not_escaped():
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"a": "<b>&"}}}]
    out = r([{"role": "user", "content": "x"}], tools=tools)
    assert '[{"name": "météo", "parameters": {"a": "<b>&"}}]' in out


@pytest.mark.parametrize("msgs", [
    [{"role": "narrator", "content": "x"}],
    [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}],
])
def test_unsupported_input_is_a_value_error(msgs):
    with pytest.raises(ValueError, match="Unsupported"):
        r(msgs)
