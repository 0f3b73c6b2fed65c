"""The pure input guards (nemovl_trt/serving/guards.py): every hostile body is a GuardError with a 4xx and a
code, and legitimate bodies pass unchanged. No server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemovl_trt.serving.guards import (
    DEFAULT_BYTES_PER_TOKEN,
    INT64_MAX,
    INT64_MIN,
    GuardError,
    check_integer_ranges,
    check_prompt_bound,
    check_text_encodable,
    decode_json_body,
    guard_chat_body,
    json_depth_exceeds,
    min_prompt_tokens,
    prompt_text_bytes,
    repo_engines_dir,
    repo_model_parameters,
    served_limits,
    strict_loads,
    tokenizer_bytes_per_token,
)

M = "nvidia/nemotron-nano-12b-v2-vl"


def body(**kw: object) -> dict:
    d: dict = {"model": M, "messages": [{"role": "user", "content": "hello"}]}
    d.update(kw)
    return d


def raw(**kw: object) -> bytes:
    return json.dumps(body(**kw)).encode()


def refused(fn, *args, **kw) -> GuardError:
    with pytest.raises(GuardError) as e:
        fn(*args, **kw)
    assert 400 <= e.value.status < 500
    env = e.value.to_dict()["error"]
    assert set(env) == {"message", "type", "param", "code"} and env["code"] == e.value.code
    return e.value


# ------------------------------------------------------------------ decoding
def test_plain_body_decodes_unchanged() -> None:
    assert decode_json_body(raw(seed=1, tools=[{"type": "function", "function": {"name": "f"}}])) == body(
        seed=1, tools=[{"type": "function", "function": {"name": "f"}}])


def test_utf8_bom_is_skipped() -> None:
    assert decode_json_body(b"\xef\xbb\xbf" + raw()) == body()


@pytest.mark.parametrize("data", [b"\xff\xfe{}", "{\"a\": \"é\"}".encode("latin-1"), b"{\"a\": \"\xc3\"}",
                                  "{}".encode("utf-16"), b"\xed\xa0\x80"])
def test_not_utf8_is_invalid_json(data: bytes) -> None:
    e = refused(decode_json_body, data)
    assert (e.status, e.code) == (400, "invalid_json")


@pytest.mark.parametrize("data", [b"", b"{", b"{'a': 1}", b"[1,]", b'{"a":1}{"b":2}', b"nul", b"\x00"])
def test_malformed_json_is_invalid_json(data: bytes) -> None:
    assert refused(decode_json_body, data).code == "invalid_json"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_constants_are_refused(literal: str) -> None:
    e = refused(decode_json_body, f'{{"temperature": {literal}}}'.encode())
    assert e.code == "invalid_json" and literal in e.message


def test_integer_beyond_the_parser_limit_is_invalid_json() -> None:
    e = refused(decode_json_body, b'{"seed": ' + b"9" * 5000 + b"}")
    assert e.code == "invalid_json" and "number" in e.message


@pytest.mark.parametrize("depth", [65, 10_000, 100_000])
def test_deep_nesting_is_refused_before_parsing(depth: int) -> None:
    for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth):
        e = refused(decode_json_body, data)
        assert e.code == "invalid_json" and "64 levels" in e.message


def test_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    assert decode_json_body(b"[" * 64 + b"]" * 64, 64) is not None
    refused(decode_json_body, b"[" * 65 + b"]" * 65, 64)
    tricky = json.dumps({"t": "[[[[{{{{" * 100, "e": "\\\"[[[[" * 50, "q": '"' * 30}).encode()
    assert json_depth_exceeds(tricky.decode(), 2) is None
    assert decode_json_body(tricky, 2)["t"].startswith("[[[[")


def test_depth_counter_values() -> None:
    assert json_depth_exceeds("[[[]]]", 3) is None
    assert json_depth_exceeds("[[[[]]]]", 3) == 4
    assert json_depth_exceeds('["\\\\", [[[1]]]]', 3) == 4  # an escaped backslash does not hide the quote


# ------------------------------------------------------------------ text
def test_lone_surrogates_are_refused_with_the_field() -> None:
    e = refused(check_text_encodable, json.loads(b'{"messages":[{"role":"user","content":"a\\ud800b"}]}'))
    assert (e.code, e.param) == ("invalid_parameter", "messages[0].content")
    assert "U+D800" in e.message and "character 1" in e.message
    parts = json.loads(b'{"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}')
    assert refused(check_text_encodable, parts).param == "messages[0].content[0].text"
    key = json.loads(b'{"tools":[{"function":{"parameters":{"\\ud83d":1}}}]}')
    assert refused(check_text_encodable, key).param == "tools[0].function.parameters"


def test_well_formed_unicode_passes() -> None:
    ok = json.loads(b'{"messages":[{"role":"user","content":"\\ud83d\\ude00 caf\\u00e9 \\u0000 \xe4\xb8\xad"}]}')
    check_text_encodable(ok)
    assert ok["messages"][0]["content"].startswith("😀")


# ------------------------------------------------------------------ integers
@pytest.mark.parametrize("field,value", [("seed", 2 ** 64), ("seed", INT64_MAX + 1), ("seed", INT64_MIN - 1),
                                         ("seed", -(10 ** 100)), ("max_tokens", 2 ** 31), ("max_tokens", 0),
                                         ("max_completion_tokens", -5), ("top_k", -2), ("top_k", 2 ** 40),
                                         ("n", 2 ** 70), ("top_logprobs", -1)])
def test_integers_out_of_engine_range(field: str, value: int) -> None:
    e = refused(check_integer_ranges, body(**{field: value}))
    assert (e.code, e.param) == ("invalid_parameter", field)


def test_nested_integer_fields_and_message_of_huge_numbers() -> None:
    e = refused(check_integer_ranges, body(media_io_kwargs={"video": {"num_frames": 2 ** 33}}))
    assert e.param == "media_io_kwargs.video.num_frames"
    e = refused(check_integer_ranges, body(mm_processor_kwargs={"max_num_tiles": 0}))
    assert e.param == "mm_processor_kwargs.max_num_tiles"
    e = refused(check_integer_ranges, body(seed=10 ** 200))
    assert "201-digit integer" in e.message and len(e.message) < 200


@pytest.mark.parametrize("value", [INT64_MIN, -1, 0, 42, INT64_MAX])
def test_seed_within_int64_passes(value: int) -> None:
    check_integer_ranges(body(seed=value))


def test_non_integers_are_left_to_the_schema_check() -> None:
    check_integer_ranges(body(seed="7", max_tokens=True, top_k=1.5, n=None))


# ------------------------------------------------------------------ cheap prompt bound
def test_prompt_text_bytes_counts_text_not_media() -> None:
    b = body(messages=[{"role": "system", "content": "ab"},
                       {"role": "user", "content": [{"type": "text", "text": "é"},
                                                    {"type": "image_url", "image_url": {"url": "x" * 1000}}]}],
             tools=[{"type": "function", "function": {"name": "fn"}}])
    # "system" "ab" "user" "text" "é"(2 bytes) | "function" "fn" "type"... keys are not counted, values are
    assert prompt_text_bytes(b) == len("system") + 2 + len("user") + len("text") + 2 + len("function") + 2
    assert min_prompt_tokens(10, 3) == 4 and min_prompt_tokens(0, 3) == 0


def test_prompt_bound_refuses_what_cannot_fit_and_nothing_else() -> None:
    big = body(messages=[{"role": "user", "content": "x" * 100_000}])
    e = refused(check_prompt_bound, big, 8192, 10)
    assert (e.code, e.param) == ("context_length_exceeded", "messages") and "100004 bytes" in e.message
    check_prompt_bound(big, 8192, 13)  # 100004 / 13 = 7693 tokens at least: could fit, left to the tokenizer
    check_prompt_bound(big, None, 1)  # unknown context: no bound
    e = refused(check_prompt_bound, body(messages=[{"role": "user", "content": "x" * 7000}], max_tokens=2000), 8192, 1)
    assert "2000 max tokens" in e.message


def test_guard_chat_body_order_and_result() -> None:
    assert guard_chat_body(raw(seed=3), max_seq_len=8192) == body(seed=3)
    assert refused(guard_chat_body, b"[" * 100).code == "invalid_json"
    assert refused(guard_chat_body, raw(seed=2 ** 64)).param == "seed"
    assert refused(guard_chat_body, json.dumps(body(messages=[{"role": "user", "content": "y" * 2_000_000}])).encode(),
                   max_seq_len=8192).code == "context_length_exceeded"


# ------------------------------------------------------------------ facts from files
def test_tokenizer_bound_and_repository_facts(cpu_engines_dir: Path, triton_repo_dir: Path, tmp_path: Path) -> None:
    tb = tokenizer_bytes_per_token(cpu_engines_dir / "tokenizer" / "tokenizer.json")
    tok = json.loads((cpu_engines_dir / "tokenizer" / "tokenizer.json").read_text())
    longest = max(len(k.encode()) for k in tok["model"]["vocab"])
    longest = max(longest, max(len(a["content"].encode()) for a in tok["added_tokens"]))
    assert tb.max_token_bytes == longest and 4 <= longest < DEFAULT_BYTES_PER_TOKEN
    params = repo_model_parameters(triton_repo_dir)
    assert params["max_seq_len"] == "8192" and params["model_id"] == M
    assert repo_engines_dir(triton_repo_dir) == cpu_engines_dir.resolve()
    assert served_limits(triton_repo_dir) == (8192, tb.bytes_per_token)
    assert repo_model_parameters(tmp_path) == {} and served_limits(tmp_path) == (None, DEFAULT_BYTES_PER_TOKEN)
    # the bound is a true lower bound: real token counts are never below it
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    t = load_tokenizer(cpu_engines_dir / "tokenizer")
    for text in ("hello world " * 50, "é" * 300, "<think>" * 40, " " * 500, "----" * 100, "😀" * 50):
        assert len(t.encode(text)) >= min_prompt_tokens(len(text.encode()), tb.bytes_per_token)


# ------------------------------------------------------------------ token ids (/v1/completions, logit_bias)
def test_token_id_prompts_and_logit_bias_keys() -> None:
    from nemovl_trt.serving.guards import check_token_ids

    check_token_ids({"prompt": [0, 5, 2 ** 31 - 1], "logit_bias": {"17": 1, "0": -1}})
    check_token_ids({"prompt": [[1, 2]]})
    assert refused(check_token_ids, {"prompt": [1, 2 ** 70]}).param == "prompt"
    assert refused(check_token_ids, {"prompt": [[-1]]}).param == "prompt"
    for key in ("9" * 5000, "\u00b2", str(2 ** 40), "", "1e3"):
        assert refused(check_token_ids, {"logit_bias": {key: 1}}).param == "logit_bias"


def test_prompt_bound_for_completions() -> None:
    assert refused(check_prompt_bound, {"prompt": [3] * 9000}, 8192, 4).param == "prompt"
    assert refused(check_prompt_bound, {"prompt": "x" * 100_000}, 8192, 4).code == "context_length_exceeded"
    check_prompt_bound({"prompt": [3] * 8000}, 8192, 4)
    assert prompt_text_bytes({"prompt": ["abc"]}) == 3 and prompt_text_bytes({"prompt": [1, 2]}) == 0


def test_several_prompts_are_bounded_each_alone() -> None:
    """/v1/completions with a list of prompts: each is its own engine request, so the bound is the largest
    prompt's, not their sum; token-id lists are checked list by list."""
    from nemovl_trt.serving.guards import check_token_ids

    four = {"prompt": ["x" * 30_000] * 4}  # 120,000 bytes in all, 30,000 each: 7,500 tokens each at 4 bytes
    assert prompt_text_bytes(four) == 30_000
    check_prompt_bound(four, 8192, 4)
    e = refused(check_prompt_bound, {"prompt": ["short", "x" * 40_000]}, 8192, 4)  # 10,000 tokens alone
    assert (e.code, e.param) == ("context_length_exceeded", "prompt") and "40000 bytes" in e.message
    assert "at least 10000 tokens" in e.message
    e = refused(check_prompt_bound, {"prompt": ["x" * 30_000], "max_tokens": 1000}, 8192, 4)
    assert "plus the 1000 max tokens" in e.message
    ids = {"prompt": [[3] * 8000, [3] * 8000, "abc"]}  # 16,000 ids in all, 8,000 per prompt: each fits
    check_prompt_bound(ids, 8192, 4)
    e = refused(check_prompt_bound, {"prompt": [[3] * 10, [3] * 9000]}, 8192, 4)
    assert "at least 9000 tokens" in e.message and e.param == "prompt"
    assert prompt_text_bytes({"prompt": ["ab", [1, 2, 3], "é" * 5]}) == 10  # the largest text prompt
    check_token_ids({"prompt": [[0, 1], [2 ** 31 - 1], "text"]})
    e = refused(check_token_ids, {"prompt": [[1, 2], "text", [5, 2 ** 31]]})
    assert e.param == "prompt" and "'prompt[2][1]'" in e.message and str(2 ** 31) in e.message
    assert "'prompt[0]'" in refused(check_token_ids, {"prompt": [[-1]]}).message  # one list: as a plain prompt


# ------------------------------------------------------------------ the orjson fast path
FAST_CORPUS = [
    b'{"model":"m","messages":[{"role":"user","content":"caf\xc3\xa9 \\u00e9 \\ud83d\\ude00 \\u0000"}]}',
    b'{"seed": 9223372036854775807, "n": -9223372036854775808, "t": 0.1, "p": 1e-7, "z": -0.0, "e": 1E5}',
    b'{"a": 1, "a": 2, "b": [true, false, null, [], {}]}',
    b'  {"x": 18446744073709551615}  ',
    b'"just a string"', b"[1, 2.5, -3]", b"null",
]


@pytest.mark.parametrize("data", FAST_CORPUS)
def test_fast_path_decodes_exactly_like_json(data: bytes) -> None:
    want = json.loads(data)
    got = decode_json_body(data)
    assert got == want and json.dumps(got) == json.dumps(want)  # same values, types and key order
    ok, value = strict_loads(data)
    assert ok and value == want


@pytest.mark.parametrize("data,why", [
    (b'{"seed": 18446744073709551616}', "an integer beyond 64 bits (orjson would give a float)"),
    (b'{"seed": -9223372036854775809}', "below the 64-bit range"),
    (b'{"t": NaN}', "not standard JSON"),
    (b'{"s": "\\ud800"}', "a lone surrogate"),
    (b'{"s": "\xff"}', "not UTF-8"),
    (b'{"t": 1e400}', "infinite"),
])
def test_fast_path_declines_what_json_reads_differently(data: bytes, why: str) -> None:
    assert strict_loads(data) == (False, None), why


def test_huge_integers_keep_their_exact_value_and_refusal() -> None:
    body = decode_json_body(b'{"logit_bias": {"5": 1}, "x": 123456789012345678901234567890}')
    assert body["x"] == 123456789012345678901234567890 and type(body["x"]) is int
    e = refused(guard_chat_body, raw(seed=-(2 ** 63) - 1))
    assert e.param == "seed" and str(-(2 ** 63) - 1) in e.message


def test_lone_surrogate_still_refused_with_its_field_through_guard_chat_body() -> None:
    data = b'{"model":"m","messages":[{"role":"user","content":"ok \\udc00"}]}'
    e = refused(guard_chat_body, data)
    assert (e.code, e.param) == ("invalid_parameter", "messages[0].content") and "U+DC00" in e.message


def test_fast_path_still_applies_the_depth_limit() -> None:
    deep = b'{"tools": ' + b"[" * 70 + b"]" * 70 + b"}"
    assert strict_loads(deep)[0]  # valid JSON that orjson reads ...
    assert "64 levels" in refused(guard_chat_body, deep).message  # ... and still too deep for the guard
