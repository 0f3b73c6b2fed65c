"""Video sampling and decoding on real MP4 (H.264) and WEBM (VP8 / VP9) clips made here with PyAV."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from nemovl_trt.preprocess import video as V
from nemovl_trt.preprocess.errors import PreprocessError
from nemovl_trt.preprocess.video import (
    decode_video,
    frame_timestamps,
    preprocess_video,
    sample_indices,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
W, H = 96, 64


def _frame(i: int) -> np.ndarray:
    """Frame i carries its index: a bright bar at x = 3i mod W and the blue level 2i."""
    fr = np.full((H, W, 3), 40, np.uint8)
    fr[:, (3 * i) % W:(3 * i) % W + 8] = 220
    fr[..., 2] = (2 * i) % 256
    return fr


def _make_clip(codec: str, fmt: str, n: int, fps: int | Fraction, **opts) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        if opts:
            s.options = opts
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {
        "h264": _make_clip("libx264", "mp4", 90, 30, bf="3", g="30"),  # B-frames, 3 s
        "vp8": _make_clip("libvpx", "webm", 90, 30),
        "vp9": _make_clip("libvpx-vp9", "webm", 50, 25),  # 2 s at 25 fps
        "h264_long": _make_clip("libx264", "mp4", 300, 10, bf="2", g="50"),  # 30 s at 10 fps
    }


def _all_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


# ---------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(("total", "src_fps", "kw", "expected"), [
    (90, 30.0, {}, [0, 12, 25, 38, 50, 63, 76, 89]),  # 3 s at 2 fps = 6 -> raised to the minimum 8
    (90, 30.0, {"num_frames": 10}, [0, 9, 19, 29, 39, 49, 59, 69, 79, 89]),
    (5, 30.0, {}, [0, 1, 2, 3, 4]),  # never more than the clip has
    (8, 8.0, {"fps": 8.0}, list(range(8))),  # fps equal to the source: every frame
    (90, 30.0, {"num_frames": 90}, list(range(90))),
    (11, 1.0, {"fps": 1.0}, list(range(11))),
    (100, 10.0, {"num_frames": 3}, [0, 49, 99]),  # explicit num_frames is honoured below the minimum
])
def test_sample_indices_table(total, src_fps, kw, expected):
    assert sample_indices(total, src_fps, **kw) == expected


@pytest.mark.parametrize(("total", "src_fps", "kw", "n"), [
    (1800, 30.0, {}, 120),  # 60 s at the default 2 fps
    (1800, 30.0, {"fps": 4.0}, 128),  # 240 -> capped at 128
    (1800, 30.0, {"fps": 0.1}, 8),  # 6 -> raised to 8
    (300, 10.0, {"fps": 2.0}, 60),
    (2997, 29.97, {"fps": 1.0}, 100),  # float fps: 100.0 frames exactly
    (1800, 30.0, {"num_frames": 128}, 128),
])
def test_sample_counts_and_spacing(total, src_fps, kw, n):
    idx = sample_indices(total, src_fps, **kw)
    assert len(idx) == n
    assert idx[0] == 0 and idx[-1] == total - 1  # the whole clip is covered
    gaps = np.diff(idx)
    step = (total - 1) / (n - 1)
    assert gaps.min() >= int(step) and gaps.max() <= int(step) + 1  # evenly spaced


@pytest.mark.parametrize(("total", "src_fps", "kw", "param"), [
    (90, 30.0, {"fps": 31.0}, "fps"),  # above the source fps
    (90, 30.0, {"num_frames": 91}, "num_frames"),  # above the frame count
    (1000, 30.0, {"num_frames": 129}, "num_frames"),  # above the 128 limit
    (90, 30.0, {"fps": 2.0, "num_frames": 8}, "fps"),  # exclusive
    (90, 30.0, {"fps": 0.0}, "fps"),
    (90, 30.0, {"fps": -1.0}, "fps"),
    (90, 30.0, {"num_frames": 0}, "num_frames"),
    (90, 30.0, {"num_frames": 2.5}, "num_frames"),
])
def test_sampling_errors(total, src_fps, kw, param):
    with pytest.raises(PreprocessError) as e:
        sample_indices(total, src_fps, **kw)
    assert e.value.code == "invalid_video_sampling" and e.value.param == param


@pytest.mark.parametrize(("indices", "src_fps", "expected"), [
    ([0, 12, 25, 89], 30.0, ["0.00", "0.40", "0.82", "2.94"]),  # int(1000/30) = 33 ms per frame
    ([0, 12, 25], 29.97, ["0.00", "0.40", "0.82"]),  # int(33.37) = 33
    ([0, 12, 24], 24.0, ["0.00", "0.49", "0.98"]),  # int(41.67) = 41
    ([0, 49, 99], 10.0, ["0.00", "4.90", "9.90"]),
])
def test_timestamps(indices, src_fps, expected):
    assert [f"{t:.2f}" for t in frame_timestamps(indices, src_fps)] == expected


# ---------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize(("name", "kw", "total", "fps", "expected_idx"), [
    ("h264", {}, 90, 30.0, [0, 12, 25, 38, 50, 63, 76, 89]),
    ("h264", {"num_frames": 17}, 90, 30.0, None),
    ("h264", {"fps": 30.0}, 90, 30.0, list(range(90))),
    ("vp8", {"num_frames": 12}, 90, 30.0, None),
    ("vp9", {}, 50, 25.0, [0, 7, 14, 21, 28, 35, 42, 49]),
    ("h264_long", {}, 300, 10.0, None),  # 30 s at 2 fps = 60 frames
])
def test_decode_gives_the_sampled_frames(clips, name, kw, total, fps, expected_idx):
    data = clips[name]
    vf = decode_video(data, **kw)
    assert vf.total_frames == total and vf.source_fps == pytest.approx(fps)
    want = expected_idx or sample_indices(total, fps, **kw)
    assert vf.indices == want
    assert vf.timestamps == frame_timestamps(want, fps)
    ref = _all_frames(data)
    assert len(ref) == total
    assert vf.frames.shape == (len(want), H, W, 3) and vf.frames.dtype == np.uint8
    for k, i in enumerate(want):
        assert np.array_equal(vf.frames[k], ref[i]), f"frame {i} differs from a full decode"
        # and it is frame i: the closest of the nearby source frames (the pattern repeats every 32)
        near = range(max(0, i - 15), min(total, i + 16))
        err = [np.abs(vf.frames[k].astype(int) - _frame(j)).mean() for j in near]
        assert near[int(np.argmin(err))] == i
    if name == "h264_long":
        assert len(want) == 60


def test_decord_fallback_gives_the_same_frames(clips):
    pytest.importorskip("decord", reason="decord is an optional extra (x86_64 wheels only)")
    data = clips["h264"]
    a = decode_video(data, num_frames=9)
    b = V._decord_decode(data, None, 9, None, V.DEFAULT_MAX_FRAME_PIXELS)
    assert b.indices == a.indices and b.total_frames == a.total_frames
    assert np.array_equal(a.frames, b.frames)


def test_preprocess_video_tiles(clips):
    data = clips["vp9"]
    vt = preprocess_video(data, MEAN, STD, tile=512, num_frames=8)
    assert vt.pixel_values.shape == (8, 3, 512, 512) and vt.pixel_values.dtype == np.float32
    assert vt.num_frames == 8 and vt.indices == [0, 7, 14, 21, 28, 35, 42, 49]
    ref = _all_frames(data)
    for k in (0, 5):
        img = Image.fromarray(ref[vt.indices[k]]).resize((512, 512), Image.BICUBIC)
        x = np.asarray(img).astype(np.float32) / np.float32(255.0)
        x = ((x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).transpose(2, 0, 1)
        assert np.array_equal(vt.pixel_values[k], x)


def test_frame_count_request_above_clip(clips):
    with pytest.raises(PreprocessError) as e:
        decode_video(clips["vp9"], num_frames=51)
    assert e.value.code == "invalid_video_sampling"
    with pytest.raises(PreprocessError) as e:
        decode_video(clips["vp9"], fps=30.0)
    assert e.value.code == "invalid_video_sampling" and e.value.param == "fps"


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 10, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100])
def test_invalid_video(data):
    with pytest.raises(PreprocessError) as e:
        decode_video(data)
    assert e.value.code == "invalid_video"


def test_truncated_video(clips):
    data = clips["h264"]
    with pytest.raises(PreprocessError) as e:
        decode_video(data[: len(data) // 3])
    assert e.value.code in ("invalid_video", "invalid_video_sampling")


def test_skipping_nonreference_frames_changes_no_pixel(clips):
    data = clips["h264_long"]  # B-frames: the skipping path is active for H.264
    probe = V._pyav_probe(data)
    idx = sample_indices(probe.total_frames, probe.source_fps, num_frames=37)
    fast = V._pyav_decode(data, probe, idx, None, threads=0, allow_skip=True)
    full = V._pyav_decode(data, probe, idx, None, threads=1, allow_skip=False)
    assert np.array_equal(fast, full)
    resized = V._pyav_decode(data, probe, idx[:3], 512, threads=0)
    assert resized.shape == (3, 512, 512, 3)
    assert np.array_equal(resized[1], np.asarray(Image.fromarray(full[1]).resize((512, 512), Image.BICUBIC)))
