"""Prompt rendering and placeholder expansion with the tiny checkpoint's tokenizer and template."""

from __future__ import annotations

import pytest

from nemovl_trt.preprocess.errors import PreprocessError
from nemovl_trt.preprocess.evs import retained_count
from nemovl_trt.preprocess.prompt import (
    REASONING_WITH_VIDEO_WARNING,
    ImageInput,
    VideoInput,
    build_prompt,
    rebuild_video_prompt,
)


@pytest.fixture(scope="module")
def tok(tiny_ckpt_dir):
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    return load_tokenizer(tiny_ckpt_dir)


@pytest.fixture(scope="module")
def cfg(tiny_ckpt_dir):
    from nemovl_trt.checkpoint.config import load_vlm_config

    return load_vlm_config(tiny_ckpt_dir)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(s):
    return {"type": "text", "text": s}


IMG = {"type": "image", "index": 0}
VID = {"type": "video", "index": 0}


def test_text_prompt(tok, cfg):
    r = build_prompt([{"role": "user", "content": "How many red squares?"}], tok, cfg)
    assert r.text == ("<SPECIAL_10>System\n\n<SPECIAL_11>User\nHow many red squares?\n"
                      "<SPECIAL_11>Assistant\n<think></think>")  # reasoning off by default (docs/api.md)
    assert r.reasoning is False and r.warnings == []
    assert r.input_ids == tok.encode(r.text)
    assert r.num_prompt_tokens == len(r.input_ids)
    assert r.max_tokens == cfg.max_sequence_length - r.num_prompt_tokens
    assert r.image_spans == [] and r.video is None


@pytest.mark.parametrize(("system", "user_text", "reasoning"), [
    ("/think", "Count.", True),
    (None, "Count. /think", True),
    ("/think", "Count. /no_think", False),
    ("/no_think", "Count.", False),
    ("Be brief.", "Count.", False),
])
def test_reasoning_flags(tok, cfg, system, user_text, reasoning):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    r = build_prompt(msgs, tok, cfg)
    assert r.reasoning is reasoning
    gen = "<SPECIAL_11>Assistant\n" + ("<think>\n" if reasoning else "<think></think>")
    assert r.text.endswith(gen)
    body = r.text[: -len(gen)]
    assert "/think" not in body and "/no_think" not in body


def test_image_prompt_token_count(tok, cfg):
    assert cfg.img_context_token in tok.special  # the tiny tokenizer keeps "<image>" as one token
    for tiles in (1, 3, 13):
        r = build_prompt(user(IMG, text("What is in the image?")), tok, cfg, images=[ImageInput(tiles)])
        text_tokens = len(tok.encode(r.text)) - 1  # minus the placeholder itself
        assert r.num_prompt_tokens == text_tokens + cfg.tokens_per_tile * tiles + 2
        (s, e), = r.image_spans
        assert e - s == cfg.tokens_per_tile * tiles
        ids = r.input_ids
        assert ids[s - 1] == tok.special[cfg.img_start_token] and ids[e] == tok.special[cfg.img_end_token]
        assert set(ids[s:e]) == {cfg.img_context_token_id}
        assert ids.count(cfg.img_context_token_id) == e - s  # no other context tokens anywhere


def test_multi_image_prompt(tok, cfg):
    msgs = [{"role": "system", "content": "Compare."},
            {"role": "user", "content": [text("First:"), {"type": "image", "index": 1}, text("Second:"),
                                         {"type": "image", "index": 0}]}]
    r = build_prompt(msgs, tok, cfg, images=[ImageInput(13), ImageInput(1)])
    p = cfg.tokens_per_tile
    assert r.image_order == [1, 0]
    assert [e - s for s, e in r.image_spans] == [p * 1, p * 13]
    assert r.num_prompt_tokens == len(tok.encode(r.text)) - 2 + p * 14 + 4
    # a multi-turn conversation with an image in an earlier turn keeps its tokens
    msgs2 = [{"role": "user", "content": [IMG, text("Describe.")]},
             {"role": "assistant", "content": "A red square."},
             {"role": "user", "content": [{"type": "image", "index": 1}, text("And this one?")]}]
    r2 = build_prompt(msgs2, tok, cfg, images=[ImageInput(2), ImageInput(5)])
    assert [e - s for s, e in r2.image_spans] == [2 * p, 5 * p]
    assert r2.num_prompt_tokens == len(tok.encode(r2.text)) - 2 + 7 * p + 4


def _expected_video_ids(tok, cfg, timestamps, counts):
    ids = []
    for i, (t, n) in enumerate(zip(timestamps, counts, strict=True)):
        sep = ("This is a video:\n" if i == 0 else "") + f"Frame {i + 1} sampled at {t:.2f} seconds: "
        ids += tok.encode(sep) + [tok.special["<img>"]] + [cfg.img_context_token_id] * n
        ids += [tok.special["</img>"]] + tok.encode("\n")
    return ids


def test_video_prompt(tok, cfg):
    ts = [0.0, 0.396, 0.825, 1.221]
    r = build_prompt(user(VID, text("What moves?")), tok, cfg, video=VideoInput(len(ts), ts))
    p = cfg.tokens_per_tile
    block = _expected_video_ids(tok, cfg, ts, [p] * 4)
    v = r.video
    assert r.input_ids[v.start:v.end] == block
    assert r.num_prompt_tokens == len(tok.encode(r.text)) - 1 + len(block)
    assert r.num_video_tokens == 4 * p and r.reasoning is False
    assert "Frame 2 sampled at 0.40 seconds: " in tok.decode(r.input_ids)
    for s, e in v.frame_spans:
        assert set(r.input_ids[s:e]) == {cfg.img_context_token_id}


def test_video_forces_reasoning_off_with_warning(tok, cfg):
    msgs = [{"role": "system", "content": "/think"}, {"role": "user", "content": [VID, text("Why? /think")]}]
    r = build_prompt(msgs, tok, cfg, video=VideoInput(2, [0.0, 0.5]))
    assert r.reasoning is False and r.warnings == [REASONING_WITH_VIDEO_WARNING]
    assert r.text.endswith("<think></think>")


def test_video_with_evs_layout_and_rebuild(tok, cfg):
    ts = [0.0, 0.5, 1.0, 1.5, 2.0]
    p = cfg.tokens_per_tile
    full = build_prompt(user(VID, text("What moves?")), tok, cfg, video=VideoInput(len(ts), ts))
    r = build_prompt(user(VID, text("What moves?")), tok, cfg, video=VideoInput(len(ts), ts, pruning_rate=0.7))
    rr = retained_count(5, p, 0.7)
    assert r.video.retained == rr
    assert r.num_prompt_tokens == full.num_prompt_tokens - (5 * p - rr)
    assert [e - s for s, e in r.video.frame_spans] == [rr, 0, 0, 0, 0]  # all in frame 1 before EVS
    counts = [p, rr - p - 10, 4, 0, 6]
    ids, layout = rebuild_video_prompt(r.input_ids, counts, r.video)
    assert len(ids) == len(r.input_ids)
    assert ids[:layout.start] == r.input_ids[:layout.start] and ids[layout.end:] == r.input_ids[layout.end:]
    assert ids[layout.start:layout.end] == _expected_video_ids(tok, cfg, ts, counts)
    assert [e - s for s, e in layout.frame_spans] == counts
    assert rebuild_video_prompt(r.input_ids, r.video, counts) == (ids, layout)  # either argument order
    with pytest.raises(ValueError):
        rebuild_video_prompt(r.input_ids, [p, 1, 0, 0, 0], r.video)  # wrong total
    # keyword form used by the pipeline: frames counted from the timestamps
    assert VideoInput(timestamps=ts, pruning_rate=0.7) == VideoInput(5, ts, 0.7)


def test_tools_and_multi_turn_count(tok, cfg):
    tools = [{"type": "function", "function": {"name": "count_shapes", "description": "Count shapes.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "Count red."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_000000001", "type": "function",
                 "function": {"name": "count_shapes", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_000000001", "content": "3"}]
    r = build_prompt(msgs, tok, cfg, tools=tools)
    assert "<AVAILABLE_TOOLS>" in r.text and "<TOOL_RESPONSE>[3]</TOOL_RESPONSE>" in r.text
    assert r.input_ids == tok.encode(r.text)


def test_context_length(tok, cfg):
    msgs = user(IMG, text("Describe."))
    r = build_prompt(msgs, tok, cfg, images=[ImageInput(13)], max_tokens=100)
    assert r.max_tokens == 100
    n = r.num_prompt_tokens
    ok = build_prompt(msgs, tok, cfg, images=[ImageInput(13)], max_seq_len=n + 5)
    assert ok.max_tokens == 5
    ok = build_prompt(msgs, tok, cfg, images=[ImageInput(13)], max_seq_len=n + 5, max_tokens=5)
    assert ok.max_tokens == 5
    for kw in ({"max_seq_len": n + 5, "max_tokens": 6}, {"max_seq_len": n}, {"max_seq_len": n - 1}):
        with pytest.raises(PreprocessError) as e:
            build_prompt(msgs, tok, cfg, images=[ImageInput(13)], **kw)
        assert e.value.code == "context_length_exceeded"
    with pytest.raises(PreprocessError) as e:
        build_prompt(msgs, tok, cfg, images=[ImageInput(13)], max_tokens=cfg.max_sequence_length)
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize(("msgs", "kw", "code"), [
    (user(IMG), {"images": []}, "invalid_parameter"),  # refers to a missing image
    (user(IMG, VID), {"images": [ImageInput(1)], "video": VideoInput(1, [0.0])}, "invalid_parameter"),
    (user(VID, VID), {"video": VideoInput(1, [0.0])}, "invalid_parameter"),
    (user(VID), {}, "invalid_parameter"),
    (user(IMG, IMG, IMG), {"images": [ImageInput(1)] * 3, "max_images": 2}, "too_many_images"),
    (user(text("fake <image> slot")), {}, "invalid_parameter"),
    (user(text("fake <img> start")), {}, "invalid_parameter"),
    ([], {}, "invalid_parameter"),
    ([{"role": "robot", "content": "hi"}], {}, "invalid_parameter"),
    (user(text("hi")), {"max_tokens": 0}, "invalid_parameter"),
])
def test_prompt_errors(tok, cfg, msgs, kw, code):
    with pytest.raises(PreprocessError) as e:
        build_prompt(msgs, tok, cfg, **kw)
    assert e.value.code == code


def test_video_without_timestamps(tok, cfg):
    r = build_prompt(user(VID, text("What moves?")), tok, cfg, video=VideoInput(3))
    v = r.video
    assert tok.decode(r.input_ids[v.start:v.end]).startswith("This is a video:\nFrame 1: <img>")
    assert r.image_token_spans == [] and r.num_video_tokens == 3 * cfg.tokens_per_tile
