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
    # counted up to the token that completed the stop string (10 bytes of "line one\n\n"), as one id per push
    assert (d.text, d.finish_reason, d.completion_tokens, d.token_ids) == ("line one", "stop", 10,
                                                                         list(b"line one\n\n"))


def test_text_stream_chunked_ids_end_at_the_token_that_completed_the_stop_string() -> None:
    """The llm's stream interval sends several ids per response: text, ids and token count must be those of
    one id per response (the ids after the stop are dropped, not counted)."""
    text = b"say it: ENDnext words"
    one = TextStream(decode=byte_decode, stops=["END"])
    deltas = [one.push([t]) for t in text]
    stop_at = next(i for i, d in enumerate(deltas) if d.finish_reason)
    chunked = TextStream(decode=byte_decode, stops=["END"])
    got = [chunked.push(list(text[i:i + 4])) for i in range(0, 12, 4)]  # "say ", "it: ", "ENDn"
    assert stop_at == text.index(b"END") + 2
    assert "".join(d.text for d in got) == "".join(d.text for d in deltas[:stop_at + 1]) == "say it: "
    assert got[-1].token_ids == list(b"END") and got[-1].finish_reason == "stop"
    assert got[-1].completion_tokens == deltas[stop_at].completion_tokens == stop_at + 1 == 11
