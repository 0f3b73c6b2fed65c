"""Incremental detokenization, stop strings and finish reasons (nemovl_trt.triton.streaming)."""

from __future__ import annotations

import pytest

from nemovl_trt.triton.streaming import IncrementalDetokenizer, StopStringMatcher, TextStream


def byte_decode(ids: list[int]) -> str:
    """A byte-level 'tokenizer': each id is one UTF-8 byte (what byte-fallback BPE does at worst)."""
    return bytes(ids).decode("utf-8", errors="replace")


TEXT = "héllo wörld — 世界 🎉!"


def test_multibyte_characters_are_only_emitted_complete() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    deltas = [detok.push([b]) for b in TEXT.encode("utf-8")]
    assert "".join(deltas) + detok.flush() == TEXT
    assert all("\ufffd" not in d for d in deltas)
    # the 4 bytes of the emoji produce nothing until the last one
    emoji = "🎉".encode()
    start = len(TEXT.encode("utf-8")) - len(emoji) - 1
    assert deltas[start:start + 3] == ["", "", ""]
    assert deltas[start + 3] == "🎉"


def test_detokenizer_matches_full_decode_with_real_tokenizer(tiny_ckpt_dir) -> None:
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt_dir)
    text = "The invoice total is 42.50 €; naïve café — 日本 ✓"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(lambda x: tok.decode(x))
    out = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert out == tok.decode(ids)


@pytest.mark.parametrize("chunks, stops, expected, stopped", [
    (["Hello ", "wor", "ld END more"], ["END"], "Hello world ", True),
    (["ab", "c<", "/s", "top> tail"], ["</stop>"], "abc", True),
    (["partial E", "N", "!"], ["END"], "partial EN!", False),  # prefix held back, then released
    (["x", "y"], [], "xy", False),
    (["one two", " three"], ["two", "one t"], "", True),  # earliest occurrence wins
])
def test_stop_strings(chunks: list[str], stops: list[str], expected: str, stopped: bool) -> None:
    m = StopStringMatcher(stops)
    out = ""
    hit = False
    for c in chunks:
        emit, hit = m.push(c)
        out += emit
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (expected, stopped)


def test_stop_prefix_is_held_back_until_decided() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("abc ST") == ("abc ", False)
    assert m.push("O") == ("", False)
    assert m.push("P and more") == ("", True)


def test_text_stream_eos_counts_but_has_no_text_and_finishes_stop() -> None:
    eos = 0
    s = TextStream(decode=lambda ids: bytes(ids).decode("utf-8", "replace"), eos_ids=(eos,))
    d1 = s.push(list(b"hi"))
    d2 = s.push([eos], "stop")
    assert (d1.text, d1.finish_reason, d1.completion_tokens) == ("hi", "", 2)
    assert (d2.text, d2.finish_reason, d2.completion_tokens, d2.token_ids) == ("", "stop", 3, [eos])


def test_text_stream_length_flushes_held_text() -> None:
    s = TextStream(decode=byte_decode, stops=["zz"])
    d1 = s.push(list(b"abz"))
    d2 = s.push(list(b"q"), "length")
    assert (d1.text, d2.text, d2.finish_reason) == ("ab", "zq", "length")


def test_text_stream_stop_string_finishes_stop() -> None:
    s = TextStream(decode=byte_decode, stops=["\n\n"])
    d = s.push(list(b"line one\n\nline two"))
    assert (d.text, d.finish_reason, d.completion_tokens) == ("line one", "stop", 18)


# ------------------------------------------------------------------------------- the llm's ResponsePump
def test_merge_messages_joins_runs_of_one_choice_until_it_finishes() -> None:
    from nemovl_trt.triton.streaming import StreamMessage, merge_messages

    lp = lambda *vals: {"tokens": [[v, []] for v in vals]}  # noqa: E731
    msgs = [StreamMessage([1], "", 0, {**lp(-0.1), "prompt": [None, [-1.0, []]]}), StreamMessage([2], "", 0, lp(-0.2)),
            StreamMessage([7], "", 1, lp(-0.7)), StreamMessage([3], "length", 0, lp(-0.3)),
            StreamMessage([8], "", 1, lp(-0.8)), StreamMessage([9], "stop", 1, lp(-0.9), done=True)]
    out = merge_messages(msgs)
    assert [(m.token_ids, m.finish_reason, m.index, m.done) for m in out] == [
        ([1, 2], "", 0, False), ([7], "", 1, False), ([3], "length", 0, False), ([8, 9], "stop", 1, True)]
    assert out[0].logprobs == {"tokens": [[-0.1, []], [-0.2, []]], "prompt": [None, [-1.0, []]]}
    assert out[3].logprobs == {"tokens": [[-0.8, []], [-0.9, []]]}
    assert msgs[0].token_ids == [1] and msgs[0].logprobs["tokens"] == [[-0.1, []]]  # inputs untouched
    finished = [StreamMessage([4], "stop", 0), StreamMessage([], "", 0)]
    assert len(merge_messages(finished)) == 2  # nothing joins a finished choice


def test_response_pump_keeps_order_merges_while_busy_and_drops_a_failed_stream() -> None:
    import threading

    from nemovl_trt.triton.streaming import ResponsePump, StreamMessage

    sent: dict[str, list[StreamMessage]] = {"a": [], "b": [], "gone": []}
    gate = threading.Event()
    errors: list[str] = []

    def send(key: str, msg: StreamMessage) -> None:
        gate.wait(10)  # the first send blocks: what queues meanwhile must merge
        if key == "gone":
            raise ConnectionError("client left")
        sent[key].append(msg)

    pump = ResponsePump(send, threads=1, on_error=lambda key, e: errors.append(f"{key}: {e}"))
    pump.put("a", StreamMessage([0]))
    for i in range(1, 6):
        pump.put("a", StreamMessage([i]))
        pump.put("b", StreamMessage([10 + i], "length" if i == 5 else "", done=i == 5))
        pump.put("gone", StreamMessage([20 + i]))
    gate.set()
    pump.put("a", StreamMessage([6], "stop", done=True))
    pump.close()
    assert [t for m in sent["a"] for t in m.token_ids] == list(range(7))
    assert [t for m in sent["b"] for t in m.token_ids] == [11, 12, 13, 14, 15]
    assert sent["a"][-1].done and sent["b"][-1].finish_reason == "length"
    assert len(sent["b"]) == 1 and len(sent["a"]) <= 3  # merged: fewer responses than messages
    assert errors == ["gone: client left"] and sent["gone"] == []  # one error, nothing after it
    assert pump.messages == 17 and pump.sent == len(sent["a"]) + len(sent["b"])
    with pytest.raises(ValueError, match="at least 1 thread"):
        ResponsePump(send, threads=0)


def test_response_pump_interval_batches_a_fast_stream() -> None:
    import time

    from nemovl_trt.triton.streaming import ResponsePump, StreamMessage

    got: list[list[int]] = []
    pump = ResponsePump(lambda key, msg: got.append(msg.token_ids), interval_s=0.2)
    pump.put("a", StreamMessage([0]))  # the pump was idle: sent at once
    time.sleep(0.05)
    for i in range(1, 5):
        pump.put("a", StreamMessage([i]))  # within the interval: one response
    pump.put("a", StreamMessage([5], "stop", done=True))
    pump.close()
    assert got[0] == [0] and [t for ids in got for t in ids] == [0, 1, 2, 3, 4, 5] and len(got) == 2
