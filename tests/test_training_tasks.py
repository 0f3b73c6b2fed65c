"""The synthetic visual-QA generator: determinism, answers checked against the pixels, tile counts, and
the property the `detail` type exists for (its answer is invisible at 512×512)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from nemovl_trt.checkpoint.presets import preset_config
from nemovl_trt.preprocess.image import image_to_tiles, num_tiles
from nemovl_trt.preprocess.video import decode_video
from nemovl_trt.training.tasks import (
    COLORS,
    DETAIL_SIZE,
    MAX_COUNT,
    PATTERNS,
    QUESTION_TYPES,
    SHAPES,
    TRAINED_VIDEO_PRUNING_RATE,
    VIDEO_FRAMES,
    WORDS,
    answer_vocabulary,
    draw_shape,
    generate_sample,
    generate_samples,
    normalize_answer,
    texture,
)

N = 24  # samples per type in the pixel checks
TINY = preset_config("tiny")
MEAN, STD = TINY["norm_mean"], TINY["norm_std"]


def _px(img: np.ndarray, x: float, y: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in img[int(round(y)), int(round(x))])


def test_samples_are_deterministic_and_splits_differ() -> None:
    for t in QUESTION_TYPES:
        a, b = generate_sample(t, 3, seed=5, split="eval"), generate_sample(t, 3, seed=5, split="eval")
        other = generate_sample(t, 3, seed=5, split="train")
        assert (a.question, a.answer) == (b.question, b.answer)
        if a.image is not None:
            assert np.array_equal(a.image, b.image)
            assert a.image_png() == b.image_png()
            assert not np.array_equal(a.image, other.image)
        else:
            assert a.video == b.video
            assert a.video != other.video


def test_generate_samples_round_robin() -> None:
    samples = generate_samples(2 * len(QUESTION_TYPES) + 1, seed=1)
    assert [s.qtype for s in samples[:len(QUESTION_TYPES)]] == list(QUESTION_TYPES)
    assert samples[-1].qtype == QUESTION_TYPES[0] and samples[-1].index == 2
    for s in samples:
        assert s.answer in answer_vocabulary(s.qtype)


def test_answers_cover_the_vocabulary() -> None:
    for t in QUESTION_TYPES:
        seen = {generate_sample(t, i, seed=0, split="train").answer for i in range(80)}
        assert seen == set(answer_vocabulary(t)), t


def test_color_answer_is_the_pixel_colour_at_the_centre() -> None:
    for i in range(N):
        s = generate_sample("color", i, seed=0)
        cx, cy = s.meta["center"]
        r, stroke = s.meta["radius"], s.meta["stroke"]
        # the outline's left-most stroke (every shape reaches x = cx - 0.85 r … cx - r near some y)
        painted = np.all(s.image == np.array(COLORS[s.answer], dtype=np.uint8), axis=-1)
        assert painted.sum() > stroke * r, s.meta
        ys, xs = np.nonzero(painted)
        assert abs(xs.mean() - cx) < 0.1 * r
        assert s.image.shape[0] == s.image.shape[1] <= 512


def test_shape_image_is_exactly_the_answer_outline() -> None:
    kinds = set()
    for i in range(N):
        s = generate_sample("shape", i, seed=0)
        bg = tuple(int(v) for v in s.image[0, 0])
        cx, cy = s.meta["center"]
        renders = {}
        for kind in SHAPES:
            img = Image.new("RGB", s.image.shape[1::-1], bg)
            draw_shape(ImageDraw.Draw(img), kind, cx, cy, s.meta["radius"], COLORS[s.meta["color"]],
                       stroke=s.meta["stroke"])
            renders[kind] = np.asarray(img)
        assert np.array_equal(renders[s.answer], s.image)
        for kind in SHAPES:
            if kind != s.answer:  # the other outlines differ in many pixels, not just a few
                assert np.any(renders[kind] != s.image, axis=-1).mean() > 0.02
        kinds.add(s.answer)
    assert kinds == set(SHAPES)


def test_count_answer_matches_inked_area_and_centres() -> None:
    for i in range(N):
        s = generate_sample("count", i, seed=0)
        n = int(s.answer)
        assert 1 <= n <= MAX_COUNT and len(s.meta["centers"]) == n
        colour = np.array(s.meta["ink"], dtype=np.uint8)
        painted = np.all(s.image == colour, axis=-1).sum()
        one = np.pi * s.meta["radius"] ** 2
        assert abs(painted / one - n) < 0.05 * n, (painted / one, n)
        for cx, cy in s.meta["centers"]:
            assert _px(s.image, cx, cy) == s.meta["ink"]


def test_read_image_is_exactly_the_answer_word_rendered() -> None:
    for i in range(N):
        s = generate_sample("read", i, seed=0)
        bg = tuple(int(v) for v in s.image[0, 0])
        ink = tuple(int(v) for v in s.image[s.image.sum(-1).argmin() // s.image.shape[1],
                                            s.image.sum(-1).argmin() % s.image.shape[1]])
        font = ImageFont.load_default(size=s.meta["font_size"])

        renders = {}
        for word in WORDS:
            img = Image.new("RGB", s.image.shape[1::-1], bg)
            ImageDraw.Draw(img).text(s.meta["origin"], word, fill=ink, font=font)
            renders[word] = np.asarray(img)
        assert np.array_equal(renders[s.answer], s.image)
        assert all(not np.array_equal(renders[w], s.image) for w in WORDS if w != s.answer)


def test_single_tile_types_are_one_tile_and_detail_is_two_plus_thumbnail() -> None:
    for t in ("color", "shape", "count", "read"):
        for i in range(8):
            h, w = generate_sample(t, i, seed=0).image.shape[:2]
            assert num_tiles(w, h, 12) == 1
    h, w = generate_sample("detail", 0, seed=0).image.shape[:2]
    assert (w, h) == DETAIL_SIZE
    assert num_tiles(w, h, 12) == 3
    assert num_tiles(w, h, 1) == 1


@pytest.mark.parametrize("pattern", PATTERNS)
def test_texture_pairs_average_to_the_same_grey(pattern: str) -> None:
    tex = texture(pattern, 6, 8, 10, 250, phase=1).astype(int)
    assert np.all(tex[:, 0::2] + tex[:, 1::2] == 260) or pattern == "plain"
    if pattern == "plain":
        assert np.all(tex == 130)


def test_detail_answer_is_the_box_texture_and_invisible_in_the_thumbnail() -> None:
    for i in range(6):
        s = generate_sample("detail", i, seed=0)
        x0, y0, box = s.meta["box"]
        b = s.meta["border"]
        inner = s.image[y0 + b:y0 + box - b, x0 + b:x0 + box - b, 0].astype(int)
        low, high = s.meta["levels"]
        if s.answer == "plain":
            assert np.all(inner == (low + high) // 2)
        elif s.answer == "stripes":
            assert np.all(inner[:, 0] == inner[:, 2]) and np.all(inner[:, 0] != inner[:, 1])
            assert np.all(inner[0] == inner[1])
        else:
            assert np.all(inner[0, :-1] != inner[0, 1:]) and np.all(inner[0] != inner[1])
        # swap in the other textures: the full-resolution tiles change a lot; the 512 thumbnail (and the
        # single tile of max_num_tiles=1) only in the 2 columns where the box's inner edges meet the
        # bicubic kernel (interior: at most the rounding of the plain grey)
        tiles = {}
        for p in PATTERNS:
            img = s.image.copy()
            img[y0 + b:y0 + box - b, x0 + b:x0 + box - b] = texture(p, box - 2 * b, box - 2 * b, low, high, 0)[..., None]
            tiles[p] = (image_to_tiles(img, 12, MEAN, STD), image_to_tiles(img, 1, MEAN, STD))
        scale = DETAIL_SIZE[0] // 512
        keep = np.ones(512, dtype=bool)
        for edge in (x0 // scale, (x0 + box) // scale):
            keep[edge - 3:edge + 3] = False
        for p in PATTERNS[1:]:
            full_a, one_a = tiles[PATTERNS[0]]
            full_b, one_b = tiles[p]
            assert np.abs(full_a[:2] - full_b[:2]).max() > 0.9  # ≥ 68 of 255 levels
            assert np.array_equal(full_a[2], one_a[0])  # the thumbnail is what max_num_tiles=1 sees
            inner_diff = np.abs(one_a[0][..., keep] - one_b[0][..., keep]).max()
            assert inner_diff < 0.05, (p, inner_diff)  # ≤ 3 of 255 levels (uint8 rounding)
            assert np.abs(one_a[0] - one_b[0]).mean() < np.abs(full_a[:2] - full_b[:2]).mean() / 10


def test_video_frames_decode_to_the_answer_colours_in_order() -> None:
    for which in ("video_first", "video_last"):
        for i in range(4):
            s = generate_sample(which, i, seed=0)
            vf = decode_video(s.video)  # production sampling: default 2 fps, every frame of this clip
            assert vf.frames.shape[0] == VIDEO_FRAMES and vf.indices == list(range(VIDEO_FRAMES))
            boxes = s.meta["boxes"]
            assert all(a[:2] != b[:2] for a, b in zip(boxes, boxes[1:], strict=False)), boxes  # it moves every frame
            shown = []
            for frame, name, (x, y, size) in zip(vf.frames, s.meta["frames"], boxes, strict=True):
                centre = frame[y + size // 2, x + size // 2].astype(int)
                assert np.abs(centre - np.array(COLORS[name])).max() < 40, (name, centre)
                if not shown or shown[-1] != name:
                    shown.append(name)
            assert len(set(shown)) == len(shown) >= 2
            assert s.answer == (shown[0] if which == "video_first" else shown[-1])


def test_video_is_a_valid_mp4_with_the_expected_stream() -> None:
    import av

    s = generate_sample("video_last", 0, seed=0)
    with av.open(io.BytesIO(s.video)) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == "h264"
        assert float(st.average_rate) == s.meta["fps"]
        assert sum(1 for _ in c.decode(st)) == VIDEO_FRAMES


def test_normalize_answer() -> None:
    assert normalize_answer("  Red.\n") == "red"
    assert normalize_answer("3!") == "3"


def test_trained_pruning_rate_is_the_tiny_configs() -> None:
    assert TRAINED_VIDEO_PRUNING_RATE == TINY["video_pruning_rate"]
