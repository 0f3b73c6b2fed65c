"""The preprocessor/entry request logic without a server: params validation codes, limits, EVS rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nemovl_trt.preprocess.errors import PreprocessError
from nemovl_trt.triton.models.common import read_manifest
from nemovl_trt.triton.models.pipeline import EntryContext, apply_video_evs, preprocess_request
from tests.fixtures_triton import mp4_bytes, png_bytes


@pytest.fixture(scope="module")
def ctx(cpu_engines_dir: Path) -> EntryContext:
    return EntryContext.load(cpu_engines_dir, read_manifest(cpu_engines_dir))


def _run(ctx: EntryContext, params: dict | None = None, images: list[bytes] | None = None,
         video: bytes | None = None, content=None, raw_params: bytes | None = None):
    messages = [{"role": "user", "content": content or "hello"}]
    return preprocess_request(ctx, json.dumps(messages).encode(), images or [], video, None,
                              raw_params if raw_params is not None else json.dumps(params or {}).encode())


@pytest.mark.parametrize("params, code, param", [
    ({"temperature": 2.5}, "invalid_parameter", "temperature"),
    ({"top_p": 0}, "invalid_parameter", "top_p"),
    ({"max_tokens": 0}, "invalid_parameter", "max_tokens"),
    ({"max_tokens": 2.5}, "invalid_parameter", "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_parameter", "stop"),
    ({"fps": 1.0, "num_frames": 8}, "invalid_parameter", "media_io_kwargs"),
    ({"video_pruning_rate": 1.0}, "invalid_parameter", "video_pruning_rate"),
    ({"max_num_tiles": 0}, "invalid_parameter", "max_num_tiles"),
    ({"max_tokens": 8192}, "context_length_exceeded", "max_tokens"),
])
def test_bad_params_have_codes(ctx: EntryContext, params: dict, code: str, param: str) -> None:
    with pytest.raises(PreprocessError) as e:
        _run(ctx, params)
    assert (e.value.code, e.value.param) == (code, param)


def test_bad_json_and_too_many_images(ctx: EntryContext) -> None:
    with pytest.raises(PreprocessError) as e:
        _run(ctx, raw_params=b"{not json")
    assert e.value.code == "invalid_parameter"
    img = png_bytes(64, 64, seed=0)
    parts = [{"type": "image", "index": i} for i in range(5)]
    with pytest.raises(PreprocessError) as e:
        _run(ctx, images=[img] * 5, content=parts)
    assert e.value.code == "too_many_images"


def test_default_max_tokens_is_the_rest_of_the_context(ctx: EntryContext) -> None:
    res = _run(ctx, {"stop": "END"})
    n = res.input_ids.shape[0]
    assert res.info["sampling"]["max_new_tokens"] == ctx.max_seq_len - n
    assert res.info["stop"] == ["END"]
    assert res.pixel_values.shape == (0, 3, ctx.cfg.force_image_size, ctx.cfg.force_image_size)


def test_evs_rebuild_keeps_length_and_matches_counts(ctx: EntryContext) -> None:
    video = mp4_bytes(frames=24, fps=8)
    content = [{"type": "video", "index": 0}, {"type": "text", "text": "what happens?"}]
    res = _run(ctx, {"video_pruning_rate": 0.75}, video=video, content=content)
    t = res.pixel_values.shape[0]
    p, d = ctx.cfg.tokens_per_tile, ctx.cfg.llm.hidden_size
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((t, p, d)).astype(np.float32)
    ids, mm, pruned = apply_video_evs(ctx, res.input_ids, emb, res.info["video"])
    retained = max(p, int(t * p * 0.25))
    assert ids.shape == res.input_ids.shape
    assert mm.shape == (retained, d) and pruned == t * p - retained
    ctx_id = ctx.cfg.img_context_token_id
    assert int((ids == ctx_id).sum()) == int((res.input_ids == ctx_id).sum()) == retained
    assert np.array_equal(mm[:p], emb[0])  # frame 0 is always kept whole, first
    # with rate 0 nothing changes
    res0 = _run(ctx, {"video_pruning_rate": 0.0}, video=video, content=content)
    ids0, mm0, pruned0 = apply_video_evs(ctx, res0.input_ids, emb, res0.info["video"])
    assert np.array_equal(ids0, res0.input_ids) and mm0.shape == (t * p, d) and pruned0 == 0
