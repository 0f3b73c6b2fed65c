"""Video decoding and frame sampling (docs/model.md §3.1–3.2).

Sampling rule (`sample_indices`)
--------------------------------
* ``fps`` (default 2.0) and ``num_frames`` are mutually exclusive.
* With ``fps``: ``N = clamp(floor(duration·fps), MIN_FRAMES, MAX_FRAMES)`` with
  ``duration = total_frames / source_fps``; ``fps`` above the source fps is an error.
* With ``num_frames``: ``N = num_frames`` (1..MAX_FRAMES); more than the clip has is an error.
* Never more than the clip has: ``N = min(N, total_frames)``.
* Indices: every frame when ``N == total_frames``, else ``int(linspace(0, total_frames − 1, N))``
  (truncation) — the vLLM / SGLang inference rule, evenly spaced over the whole clip, first and
  last frame included. (Training used segment midpoints; we follow the serving peers, whose
  timestamps the released checkpoint is evaluated with.)
* Timestamps: ``frame_duration_ms = int(1000 / source_fps)``;
  ``t_i = index_i · frame_duration_ms / 1000`` seconds, shown as ``"%.2f"``.

Frame index k means the k-th frame in presentation order (pts order), as decord counts them.

Decoder choice (measured, see benchmarks/preprocess_bench.py)
--------------------------------------------------------------
On a 60 s 1280×720 30 fps H.264 clip (libx264 veryfast, B-frames), taking 128 frames on this
2-core machine: decord ``get_batch`` 15.6 s, which is about the cost of decoding every frame and
converting it to RGB (17.6 s with PyAV; decord seems to convert every decoded frame); a PyAV sequential
pass that converts only the wanted frames 9.4 s; the same pass also dropping unwanted
non-reference frames 6–8 s (the clip has 781 non-reference frames of 1800). PyAV is therefore
the primary decoder:

1. a demux-only pass lists packet pts (exact frame count, pts → index map; no decoding);
2. one sequential decode pass; for H.264 / HEVC, packets of unwanted frames are sent with
   ``skip_frame = NONREF`` so the decoder drops them when no other frame references them
   (reference frames are always fully decoded, so wanted frames are bit-identical to a full
   decode — tested); only the wanted frames are converted to RGB; the pass stops after the last
   wanted frame.

decord (the optional `decord` extra, x86_64 only) is the fallback when PyAV cannot read the data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nemovl_trt.preprocess.errors import INVALID_VIDEO, INVALID_VIDEO_SAMPLING, PreprocessError
from nemovl_trt.preprocess.image import _resize, frames_to_tiles

DEFAULT_FPS = 2.0
MIN_FRAMES = 8  # docs/api.md / model card: at least 8 frames ...
MAX_FRAMES = 128  # ... and at most 128
DEFAULT_MAX_FRAME_PIXELS = 8192 * 4320  # reject absurd frame sizes before decoding
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})  # non-reference frames are safe to drop
_FLOOR_EPS = 1e-9  # duration·fps is a ratio of floats; 59.999999 frames means 60


@dataclass(frozen=True)
class VideoFrames:
    """Sampled frames of one video.

    frames: uint8 [T, H, W, 3] (or [T, tile, tile, 3] when decoded with ``resize_to``).
    indices: the T frame indices (presentation order).
    source_fps: the stream's average frame rate.
    timestamps: T seconds, ``index · int(1000/source_fps) / 1000``.
    total_frames: frames in the clip.
    """

    frames: np.ndarray
    indices: list[int]
    source_fps: float
    timestamps: list[float]
    total_frames: int


def _sampling_error(msg: str, param: str) -> PreprocessError:
    return PreprocessError(INVALID_VIDEO_SAMPLING, msg, param=param)


def num_sampled_frames(total_frames: int, source_fps: float, fps: float | None = None,
                       num_frames: int | None = None, min_frames: int = MIN_FRAMES,
                       max_frames: int = MAX_FRAMES) -> int:
    """N for a clip of `total_frames` at `source_fps` (rule in the module docstring)."""
    if fps is not None and num_frames is not None:
        raise _sampling_error("Give either fps or num_frames for a video, not both.", "fps")
    if total_frames < 1 or not (source_fps > 0 and math.isfinite(source_fps)):
        raise PreprocessError(INVALID_VIDEO, "The video has no decodable frames or no frame rate.")
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise _sampling_error(f"num_frames must be a positive integer, got {num_frames!r}.", "num_frames")
        if num_frames > max_frames:
            raise _sampling_error(f"num_frames is {num_frames}, more than the limit of {max_frames}.",
                                  "num_frames")
        if num_frames > total_frames:
            raise _sampling_error(f"num_frames is {num_frames} but the video has only {total_frames} "
                                  f"frames.", "num_frames")
        return num_frames
    rate = DEFAULT_FPS if fps is None else fps
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not (rate > 0 and math.isfinite(rate)):
        raise _sampling_error(f"fps must be a positive number, got {fps!r}.", "fps")
    if rate > source_fps + _FLOOR_EPS:
        raise _sampling_error(f"fps is {rate:g} but the video has only {source_fps:g} frames per second.",
                              "fps")
    n = math.floor(total_frames * rate / source_fps + _FLOOR_EPS)
    n = min(max(n, min_frames), max_frames)
    return min(n, total_frames)


def sample_indices(total_frames: int, source_fps: float, fps: float | None = None,
                   num_frames: int | None = None, min_frames: int = MIN_FRAMES,
                   max_frames: int = MAX_FRAMES) -> list[int]:
    """Frame indices to sample, ascending (rule in the module docstring).

    Raises:
        PreprocessError ``invalid_video_sampling`` (both given, fps above the source fps,
        num_frames above the frame count or the limit, non-positive values).
    """
    n = num_sampled_frames(total_frames, source_fps, fps, num_frames, min_frames, max_frames)
    if n == total_frames:
        return list(range(total_frames))
    return [int(v) for v in np.linspace(0, total_frames - 1, n)]


def frame_timestamps(indices: Sequence[int], source_fps: float) -> list[float]:
    """Seconds for each index: ``index · int(1000 / source_fps) / 1000`` (docs/model.md §3.1)."""
    frame_duration_ms = int(1000 / source_fps)
    return [i * frame_duration_ms / 1000 for i in indices]


# ------------------------------------------------------------------------------------------ decoders
@dataclass(frozen=True)
class _Probe:
    total_frames: int
    source_fps: float
    width: int
    height: int
    pts: list[int] | None  # sorted packet pts, or None when the container has none


def _pyav_probe(data: bytes) -> _Probe:
    import av

    with av.open(io.BytesIO(data), mode="r") as c:
        if not c.streams.video:
            raise PreprocessError(INVALID_VIDEO, "The file has no video stream.")
        s = c.streams.video[0]
        pts = [p.pts for p in c.demux(s) if p.size > 0]
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate else 0.0
        width, height = s.codec_context.width, s.codec_context.height
    has_pts = all(p is not None for p in pts)
    return _Probe(total_frames=len(pts), source_fps=fps, width=width, height=height,
                  pts=sorted(pts) if has_pts else None)


class _NoPts(Exception):
    """A frame without pts came out while frames were being skipped: redo the pass without skipping."""


def _pyav_decode(data: bytes, probe: _Probe, indices: Sequence[int], resize_to: int | None,
                 threads: int, allow_skip: bool = True) -> np.ndarray:
    import av

    wanted_idx = sorted(set(indices))
    slot_of = {k: n for n, k in enumerate(wanted_idx)}
    h, w = (resize_to, resize_to) if resize_to else (probe.height, probe.width)
    out = np.empty((len(wanted_idx), h, w, 3), dtype=np.uint8)
    filled = 0
    with av.open(io.BytesIO(data), mode="r") as c:
        s = c.streams.video[0]
        cc = s.codec_context
        cc.thread_type = "AUTO" if threads != 1 else "SLICE"
        cc.thread_count = threads
        skip_ok = allow_skip and probe.pts is not None and cc.name in _SKIP_NONREF_CODECS
        slot_of_pts = {probe.pts[k]: slot_of[k] for k in wanted_idx} if probe.pts is not None else {}
        counter = 0

        def take(frame: av.VideoFrame, slot: int) -> None:
            rgb = frame.to_ndarray(format="rgb24")
            out[slot] = _resize(rgb, w, h) if resize_to else rgb

        for packet in c.demux(s):
            if skip_ok and packet.pts is not None:
                cc.skip_frame = "DEFAULT" if packet.pts in slot_of_pts else "NONREF"
            for frame in cc.decode(packet):
                # frames leave the decoder in presentation order: the pts map when pts exist,
                # else the running count
                if probe.pts is not None and frame.pts is not None:
                    slot = slot_of_pts.get(frame.pts)
                elif skip_ok:
                    raise _NoPts
                else:
                    slot = slot_of.get(counter)
                counter += 1
                if slot is not None:
                    if frame.width != probe.width or frame.height != probe.height:
                        raise PreprocessError(INVALID_VIDEO, "The video changes frame size midway.")
                    take(frame, slot)
                    filled += 1
            if filled == len(wanted_idx):
                break
    if filled != len(wanted_idx):
        raise PreprocessError(INVALID_VIDEO, "The video ended before all sampled frames were decoded.")
    return out[[slot_of[k] for k in indices]] if list(indices) != wanted_idx else out


def _decord_decode(data: bytes, fps: float | None, num_frames: int | None, resize_to: int | None,
                   max_frame_pixels: int) -> VideoFrames:
    try:
        import decord
    except ImportError:  # optional extra nemovl-trt[decord] (no aarch64 wheels): PyAV's verdict stands
        raise PreprocessError(INVALID_VIDEO, "The video could not be decoded.") from None

    try:
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        total, source_fps = len(vr), float(vr.get_avg_fps())
        first_shape = vr[0].shape
    except Exception as e:  # noqa: BLE001 - any decoder failure means an unreadable video
        raise PreprocessError(INVALID_VIDEO, "The video could not be decoded.") from e
    if first_shape[0] * first_shape[1] > max_frame_pixels:
        raise PreprocessError(INVALID_VIDEO, "The video frames are too large.")
    idx = sample_indices(total, source_fps, fps=fps, num_frames=num_frames)
    try:
        vr.seek(0)
        frames = vr.get_batch(idx).asnumpy()
    except Exception as e:  # noqa: BLE001
        raise PreprocessError(INVALID_VIDEO, "The video could not be decoded.") from e
    if resize_to:
        frames = np.stack([_resize(f, resize_to, resize_to) for f in frames])
    return VideoFrames(frames=frames, indices=idx, source_fps=source_fps,
                       timestamps=frame_timestamps(idx, source_fps), total_frames=total)


def decode_video(data: bytes, fps: float | None = None, num_frames: int | None = None,
                 resize_to: int | None = None, threads: int = 0,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> VideoFrames:
    """Decode only the sampled frames of an encoded video (MP4 / MOV / WEBM / anything FFmpeg reads).

    Args:
        data: the encoded file.
        fps, num_frames: the sampling request (see `sample_indices`); both None means 2 fps.
        resize_to: if set, each frame is resized to ``resize_to``² right after decoding (Pillow
            bicubic, the same as `frames_to_tiles` does), so a long clip never holds full frames.
        threads: decoder threads (0 = FFmpeg's choice).
        max_frame_pixels: reject larger frames before decoding.

    Returns:
        `VideoFrames`.

    Raises:
        PreprocessError: ``invalid_video`` (unreadable) or ``invalid_video_sampling``.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise PreprocessError(INVALID_VIDEO, "The video is empty.")
    data = bytes(data)
    try:
        probe = _pyav_probe(data)
    except PreprocessError:
        raise
    except Exception:  # noqa: BLE001 - PyAV cannot read it: try decord
        return _decord_decode(data, fps, num_frames, resize_to, max_frame_pixels)
    if probe.width * probe.height > max_frame_pixels:
        raise PreprocessError(INVALID_VIDEO, "The video frames are too large.")
    if probe.total_frames == 0 or probe.source_fps <= 0:
        raise PreprocessError(INVALID_VIDEO, "The video has no decodable frames or no frame rate.")
    idx = sample_indices(probe.total_frames, probe.source_fps, fps=fps, num_frames=num_frames)
    try:
        try:
            frames = _pyav_decode(data, probe, idx, resize_to, threads)
        except _NoPts:
            frames = _pyav_decode(data, probe, idx, resize_to, threads, allow_skip=False)
    except PreprocessError:
        raise
    except Exception:  # noqa: BLE001 - PyAV failed midway: decord gets one try
        return _decord_decode(data, fps, num_frames, resize_to, max_frame_pixels)
    return VideoFrames(frames=frames, indices=idx, source_fps=probe.source_fps,
                       timestamps=frame_timestamps(idx, probe.source_fps),
                       total_frames=probe.total_frames)


@dataclass(frozen=True)
class VideoTiles:
    """A preprocessed video: pixel_values float32 [T, 3, tile, tile] plus the sampling metadata."""

    pixel_values: np.ndarray
    indices: list[int]
    timestamps: list[float]
    source_fps: float
    total_frames: int

    @property
    def num_frames(self) -> int:
        return len(self.indices)


def preprocess_video(data: bytes, mean: Sequence[float], std: Sequence[float], tile: int = 512,
                     fps: float | None = None, num_frames: int | None = None,
                     threads: int = 0) -> VideoTiles:
    """Bytes → one normalized tile per sampled frame (docs/model.md §3.2). Raises PreprocessError."""
    vf = decode_video(data, fps=fps, num_frames=num_frames, resize_to=tile, threads=threads)
    return VideoTiles(pixel_values=frames_to_tiles(vf.frames, mean, std, tile), indices=vf.indices,
                      timestamps=vf.timestamps, source_fps=vf.source_fps, total_frames=vf.total_frames)
