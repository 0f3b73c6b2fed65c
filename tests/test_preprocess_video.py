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


# ------------------------------------------------------------------ keyframe-aware ranged decoding
# Clips with different GOP layouts. scenecut=0 keeps the keyframe interval regular where the
# layout is about the interval; "cuts" leaves x264's scene-cut detection on (irregular GOPs).
_NO_CUT = {"x264-params": "scenecut=0"}
LAYOUTS: dict[str, tuple[str, str, int, dict[str, str]]] = {
    "all_intra": ("libx264", "mp4", 40, {"g": "1"}),
    "gop7_p_only": ("libx264", "mp4", 120, {"g": "7", "bf": "0", **_NO_CUT}),
    "gop12_b2": ("libx264", "mp4", 120, {"g": "12", "bf": "2", **_NO_CUT}),
    "gop30_b3_pyramid": ("libx264", "mp4", 120, {"g": "30", "bf": "3", "x264-params": "scenecut=0:b-pyramid=normal"}),
    "open_gop": ("libx264", "mp4", 120, {"g": "20", "bf": "3", "x264-params": "scenecut=0:open-gop=1"}),
    "cuts": ("libx264", "mp4", 120, {"bf": "3"}),
    "hevc_b": ("libx265", "mp4", 96, {"x265-params": "keyint=24:bframes=3:log-level=none"}),
    "hevc_open_gop": ("libx265", "mp4", 96,
                      {"x265-params": "keyint=24:min-keyint=24:bframes=4:open-gop=1:log-level=none"}),
    "mkv_h264": ("libx264", "matroska", 120, {"g": "15", "bf": "3", **_NO_CUT}),
    "mpegts_h264": ("libx264", "mpegts", 120, {"g": "15", "bf": "3", **_NO_CUT}),
    "webm_vp9": ("libvpx-vp9", "webm", 90, {"g": "10"}),
}


def _make_vfr_clip(n: int = 120) -> bytes:
    """H.264 in MP4 with irregular frame durations (15..59 ms), B-frames, keyframe every 15."""
    durations = np.random.default_rng(0).integers(15, 60, n)
    pts_ms = np.concatenate([[0], np.cumsum(durations)[:-1]]).tolist()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"g": "15", "bf": "2", **_NO_CUT}
        for i in range(n):
            f = av.VideoFrame.from_ndarray(_frame(i), format="rgb24")
            f.pts, f.time_base = int(pts_ms[i]), Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _make_cut_clip(codec: str, fmt: str, n: int, **opts) -> bytes:
    """Like `_make_clip`, but the picture flips every 17 frames (scene cuts → extra keyframes)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = opts
        for i in range(n):
            img = _frame(i) if (i // 17) % 2 == 0 else np.ascontiguousarray(255 - _frame(i)[::-1])
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def layout_clips() -> dict[str, bytes]:
    out = {}
    for name, (codec, fmt, n, opts) in LAYOUTS.items():
        out[name] = _make_cut_clip(codec, fmt, n, **opts) if name == "cuts" else _make_clip(codec, fmt, n, 30, **opts)
    out["vfr"] = _make_vfr_clip()
    return out


def _decode_all_then_pick(data: bytes, indices: list[int]) -> np.ndarray:
    """The reference: decode every frame (no skipping, one thread), keep the k-th ones."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_type, s.codec_context.thread_count = "SLICE", 1
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    return np.stack([frames[i] for i in indices])


def _layout(data: bytes) -> tuple[int, int, int]:
    """(frames, keyframe packets, frames left when non-reference frames are skipped)."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        keys = [p.is_keyframe for p in c.demux(s) if p.size > 0]
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        s.codec_context.skip_frame = "NONREF"
        refs = sum(1 for _ in c.decode(s))
    return len(keys), sum(keys), refs


def test_layouts_are_what_they_claim(layout_clips):
    """The clips really have the GOP structure their names say (else the exactness tests prove less)."""
    n, keys, refs = _layout(layout_clips["all_intra"])
    assert (n, keys, refs) == (40, 40, 40)
    n, keys, refs = _layout(layout_clips["gop7_p_only"])
    assert (n, keys, refs) == (120, 18, 120)  # a keyframe every 7 frames, every frame a reference
    n, keys, refs = _layout(layout_clips["gop30_b3_pyramid"])
    assert (n, keys) == (120, 4) and refs < 100  # B-frames that nothing references
    n, keys, _ = _layout(layout_clips["cuts"])
    assert n == 120 and keys >= 4  # the scene cuts
    for name in ("hevc_b", "gop12_b2", "mkv_h264", "mpegts_h264", "vfr"):
        n, keys, refs = _layout(layout_clips[name])
        assert keys > 1 and refs < n, name
    n, keys, _ = _layout(layout_clips["webm_vp9"])
    assert (n, keys) == (90, 9)


@pytest.mark.parametrize("name", [*LAYOUTS, "vfr"])
@pytest.mark.parametrize("num_frames", [1, 5, 16, 33, 40])
def test_ranged_decode_equals_decode_all(layout_clips, name, num_frames):
    data = layout_clips[name]
    for threads in (1, 0, 3):
        vf = decode_video(data, num_frames=num_frames, threads=threads)
        ref = _decode_all_then_pick(data, vf.indices)
        assert vf.frames.shape == ref.shape
        assert np.array_equal(vf.frames, ref), f"{name}: {num_frames} frames, threads={threads}"


@pytest.mark.parametrize("name", ["gop7_p_only", "gop12_b2", "gop30_b3_pyramid", "open_gop", "cuts",
                                  "hevc_b", "hevc_open_gop", "mkv_h264", "webm_vp9", "vfr"])
def test_ranged_path_is_taken_and_skips_packets(layout_clips, name):
    """On seekable containers the keyframe-aware path runs (no silent fallback) and decodes fewer
    packets than the clip has when the sample is sparse."""
    data = layout_clips[name]
    probe = V._pyav_probe(data)
    idx = sample_indices(probe.total_frames, probe.source_fps, num_frames=3)
    ranges = V._plan_ranges(probe, idx)
    assert ranges is not None and ranges[0].first == 0
    for threads, parallel in ((1, False), (0, False), (2, True)):
        got = V._pyav_decode_ranges(data, probe, idx, None, threads, parallel=parallel)
        assert got is not None, f"{name}: fell back to the sequential pass"
        frames, sent = got
        assert sent == sum(r.packets for r in ranges) < probe.total_frames
        assert np.array_equal(frames, _decode_all_then_pick(data, idx))


def test_ranged_decode_resizes_and_keeps_request_order(layout_clips):
    data = layout_clips["gop12_b2"]
    probe = V._pyav_probe(data)
    idx = [100, 3, 57, 3]  # out of order, repeated
    frames, _ = V._pyav_decode_ranges(data, probe, idx, 512, threads=0)
    ref = _decode_all_then_pick(data, idx)
    assert frames.shape == (4, 512, 512, 3)
    for k in range(4):
        assert np.array_equal(frames[k], np.asarray(Image.fromarray(ref[k]).resize((512, 512), Image.BICUBIC)))


def _probe(pts: list[int], keys: list[int], dts: list[int] | None = None) -> V._Probe:
    """An index (decode order) written by hand."""
    return V._Probe(total_frames=len(pts), source_fps=30.0, width=W, height=H, pts=sorted(pts),
                    codec="h264", dec_pts=tuple(pts), dec_dts=tuple(dts or range(-2, len(pts) - 2)),
                    keyframe=tuple(j in keys for j in range(len(pts))))


def test_plan_ranges_rules():
    R = V._Range
    # closed GOPs, decode order I0 P3 B1 B2 P5 B4 | I6 P9 B7 B8 P11 B10 | I12
    closed = _probe([0, 3, 1, 2, 5, 4, 6, 9, 7, 8, 11, 10, 12], keys=[0, 6, 12])
    assert V._plan_ranges(closed, [0]) == [R(0, 0)]
    assert V._plan_ranges(closed, [2]) == [R(0, 3)]  # frame 2 = the 4th packet
    assert V._plan_ranges(closed, [1, 10]) == [R(0, 2), R(6, 11)]  # packets 3..5 are not decoded
    assert V._plan_ranges(closed, [6, 9]) == [R(6, 7)]
    assert V._plan_ranges(closed, [3, 4]) == [R(0, 5)]  # one range per keyframe
    assert V._plan_ranges(closed, [3, 12]) == [R(0, 1), R(12, 12)]
    assert V._plan_ranges(closed, [4, 6]) == [R(0, 6)]  # adjacent ranges: one pass, no seek
    # open GOPs, decode order I0 P3 B1 B2 | I6 B4 B5 P9 B7 B8 | I12 B10 B11: frames 4, 5, 10, 11
    # come after a keyframe with a later pts (leading frames), they may reference the GOP before
    pts = [0, 3, 1, 2, 6, 4, 5, 9, 7, 8, 12, 10, 11]
    open_gop = _probe(pts, keys=[0, 4, 10])
    assert V._plan_ranges(open_gop, [4]) == [R(0, 5)]
    assert V._plan_ranges(open_gop, [5, 12]) == [R(0, 6), R(10, 10)]
    assert V._plan_ranges(open_gop, [1, 10]) == [R(0, 2), R(4, 11)]
    assert V._plan_ranges(open_gop, [6, 9]) == [R(4, 7)]
    # an index that cannot be trusted: no plan (the caller decodes sequentially)
    # duplicate dts and pts: a packet seen after a seek could not be placed
    assert V._plan_ranges(_probe(pts, keys=[0, 4], dts=[0] * len(pts)), [3]) is not None  # pts do
    dup = V._Probe(total_frames=3, source_fps=30.0, width=W, height=H, pts=[0, 1, 2], codec="h264",
                   dec_pts=(0, 1, 2), dec_dts=(0, 0, 1), keyframe=(True, False, False))
    assert V._plan_ranges(dup, [2]) is not None  # distinct pts identify the packets
    dup = V._Probe(total_frames=3, source_fps=30.0, width=W, height=H, pts=[0, 1, 2], codec="h264",
                   dec_pts=(0, 1, 2), dec_dts=(0, None, 1), keyframe=(True, False, False))
    assert V._packet_ids(dup) == ("pts", (0, 1, 2))  # matroska leaves some dts unset
    same_pts = V._Probe(total_frames=3, source_fps=30.0, width=W, height=H, pts=[0, 1, 1], codec="h264",
                        dec_pts=(0, 1, 1), dec_dts=(0, 1, 2), keyframe=(True, False, False))
    assert V._plan_ranges(same_pts, [2]) is None  # two frames with one pts: which is frame 2?
    assert V._plan_ranges(_probe(pts, keys=[4]), [1]) is None  # nothing to start from
    no_pts = V._Probe(total_frames=3, source_fps=30.0, width=W, height=H, pts=None)
    assert V._plan_ranges(no_pts, [1]) is None


def test_split_ranges_balances_packets():
    R = V._Range
    ranges = [R(0, 9), R(20, 29), R(40, 79), R(90, 99)]
    groups = V._split_ranges(ranges, 2)
    assert [r for g in groups for r in g] == ranges  # consecutive, nothing lost
    assert groups == [[R(0, 9), R(20, 29)], [R(40, 79), R(90, 99)]]
    assert V._split_ranges(ranges[:1], 3) == [[R(0, 9)]]


def test_index_that_disagrees_with_the_file_falls_back(layout_clips):
    """A wrong index (dts shifted by one packet) is caught while decoding: no frame is guessed."""
    data = layout_clips["gop12_b2"]
    probe = V._pyav_probe(data)
    bad = V._Probe(total_frames=probe.total_frames, source_fps=probe.source_fps, width=probe.width,
                   height=probe.height, pts=probe.pts, codec=probe.codec, dec_pts=probe.dec_pts,
                   dec_dts=probe.dec_dts[1:] + (10**9,), keyframe=probe.keyframe)
    idx = [5, 60, 110]
    assert V._pyav_decode_ranges(data, bad, idx, None, threads=1) is None
    assert V._pyav_decode_ranges(data, probe, idx, None, threads=1) is not None


# ------------------------------------------------------------------------------- GPU decoder guard
def _nvdec_usable() -> bool:
    try:
        V.check_video_decoder("nvdec")
    except V.VideoDecoderUnavailable:
        return False
    return True


def test_nvdec_decoder_is_guarded(clips):
    """Without an NVIDIA GPU + torchcodec, asking for NVDEC fails with one clear line (this test
    checks only the guard: the GPU path itself is not exercised here)."""
    if _nvdec_usable():
        pytest.skip("an NVIDIA GPU and torchcodec are present: the guard does not fire")
    with pytest.raises(V.VideoDecoderUnavailable) as e:
        decode_video(clips["h264"], num_frames=8, decoder="nvdec")
    msg = str(e.value)
    assert "needs an NVIDIA GPU and torchcodec" in msg and "\n" not in msg
    with pytest.raises(V.VideoDecoderUnavailable):
        preprocess_video(clips["h264"], MEAN, STD, num_frames=8, decoder="nvdec")
    V.check_video_decoder("cpu")  # always available
    with pytest.raises(ValueError, match="video decoder must be one of cpu, nvdec"):
        decode_video(clips["h264"], decoder="gpu")
