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

Decoder (measured, see benchmarks/video_bench.py and docs/benchmarks.md "Video path")
------------------------------------------------------------------------------------
PyAV is the primary decoder; every sampled frame is bit-identical to decoding every frame and
keeping the sampled ones (tested on several GOP layouts, with and without B-frames, open GOPs,
variable frame rate, MP4 / MKV / WEBM / MPEG-TS):

1. one demux-only pass reads the packet index: pts, dts and keyframe flag of every packet
   (exact frame count, pts → index map; nothing is decoded);
2. `_plan_ranges` turns the sampled frames into decode ranges: each sampled frame needs the
   packets from the last keyframe at or before it (in decode order, with pts not after it, so
   open-GOP leading frames start one GOP earlier) up to its own packet; overlapping ranges merge.
   Packets outside every range (the rest of a GOP after its last sampled frame, GOPs without
   sampled frames) are never decoded;
3. each range: seek to its keyframe when it lies ahead of the demux position (else demux
   forward without decoding), decode the range, drain the decoder, reset it. For H.264 / HEVC,
   packets of unwanted frames are sent with ``skip_frame = NONREF``: the decoder drops them only
   when no other frame references them, so reference frames are always fully decoded; only the
   wanted frames are converted to RGB;
4. threads: several ranges are decoded at once by worker threads (consecutive groups of ranges
   with equal packet counts), one single-threaded decoder each (PyAV releases the GIL while
   decoding and converting): frame threading inside one decoder restarts its pipeline at every
   range (measured: 60 % more CPU time for 128 frames of the libx264-default clip, about the same
   on 1 s GOPs); a single range uses frame threading.

What seeking can win is set by the GOP layout: every frame from a sampled frame's keyframe up to
it must be decoded. Measured (benchmarks/video_bench.py, 2 shared cores, CPU-time ratios against
decode-every-frame-and-convert): 60 s 720p, keyframe every second, no B-frames (phone camera):
8 frames 12.5×, 32 frames 3.5×, 128 frames 1.4× (1425 of 1800 packets lie in the ranges: no exact
decoder can do much better); libx264 defaults (keyint 250, B-frames) 8.5× / 3.4× / 1.9×; a
10-minute 1080p phone clip 81× / 26× / 7.3×; all-intra 128 frames 8.7×.

Any step that cannot be trusted (packets without pts, packets that neither dts nor pts identify,
a seek that lands past the keyframe, a packet out of the index's order, a sampled frame that
never came out) falls back to one sequential pass over the whole clip with the same skipping
rule, which needs no index.

The optional NVDEC path (``decoder="nvdec"``: torchcodec with CUDA) decodes on the GPU; its
colour conversion is NVIDIA's, so its frames are not bit-identical to the CPU path. It needs an
NVIDIA GPU and torchcodec; without them it fails with one clear line (`check_video_decoder`).

decord (the optional `decord` extra, x86_64 only) is the fallback when PyAV cannot read the data.
"""

from __future__ import annotations

import bisect
import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
CPU_DECODER = "cpu"  # PyAV (FFmpeg) on the CPU, decord as the fallback
NVDEC_DECODER = "nvdec"  # torchcodec on an NVIDIA GPU (optional, guarded)
VIDEO_DECODERS = (CPU_DECODER, NVDEC_DECODER)
# Seek instead of demuxing forward when the next range starts this many packets ahead: demuxing
# a packet without decoding it costs tens of microseconds, a seek about as much as a few of them.
SEEK_MIN_GAP_PACKETS = 8
MAX_AUTO_THREADS = 16  # threads=0 never starts more decoders than this (FFmpeg caps its own at 16)


@dataclass(frozen=True)
class _Probe:
    """The packet index of the first video stream, from one demux pass (nothing decoded).

    pts: the packet pts sorted (presentation order: ``pts[k]`` is frame k), or None when some
    packet has none. ``dec_pts`` / ``dec_dts`` / ``keyframe``: per packet in decode order.
    """

    total_frames: int
    source_fps: float
    width: int
    height: int
    pts: list[int] | None
    codec: str = ""
    dec_pts: tuple[int | None, ...] = ()
    dec_dts: tuple[int | None, ...] = ()
    keyframe: tuple[bool, ...] = ()


def _pyav_probe(data: bytes) -> _Probe:
    import av

    dec_pts: list[int | None] = []
    dec_dts: list[int | None] = []
    key: list[bool] = []
    with av.open(io.BytesIO(data), mode="r") as c:
        if not c.streams.video:
            raise PreprocessError(INVALID_VIDEO, "The file has no video stream.")
        s = c.streams.video[0]
        for p in c.demux(s):
            if p.size > 0:  # the empty packets at the end only flush the decoder
                dec_pts.append(p.pts)
                dec_dts.append(p.dts)
                key.append(p.is_keyframe)
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate else 0.0
        width, height = s.codec_context.width, s.codec_context.height
        codec = s.codec_context.name
    has_pts = all(p is not None for p in dec_pts)
    return _Probe(total_frames=len(dec_pts), source_fps=fps, width=width, height=height,
                  pts=sorted(dec_pts) if has_pts else None, codec=codec,  # type: ignore[type-var]
                  dec_pts=tuple(dec_pts), dec_dts=tuple(dec_dts), keyframe=tuple(key))


@dataclass(frozen=True)
class _Range:
    """Packets ``first..last`` (decode order, inclusive) decoded in one go; ``first`` is a keyframe."""

    first: int
    last: int

    @property
    def packets(self) -> int:
        return self.last - self.first + 1


def _packet_ids(probe: _Probe) -> tuple[str, tuple[int | None, ...]] | None:
    """How a demuxed packet is recognised in the index after a seek: its dts when every packet has a
    distinct one, else its pts (matroska leaves some dts unset), else None (no seeking)."""
    for attr, ids in (("dts", probe.dec_dts), ("pts", probe.dec_pts)):
        if ids and None not in ids and len(set(ids)) == len(ids):
            return attr, ids
    return None


def _plan_ranges(probe: _Probe, indices: Sequence[int]) -> list[_Range] | None:
    """Decode ranges that produce the frames `indices` (rule in the module docstring, step 2).

    Returns None when the index cannot be trusted for seeking (no pts, missing or duplicate
    pts / dts, no keyframe before a sampled frame): the caller then decodes sequentially.
    """
    if probe.pts is None or len(set(probe.pts)) != probe.total_frames or _packet_ids(probe) is None:
        return None
    pos_of_pts = {p: j for j, p in enumerate(probe.dec_pts)}
    keys = [j for j, k in enumerate(probe.keyframe) if k]
    if not keys:
        return None
    spans: dict[int, int] = {}  # first packet -> last packet
    for k in sorted(set(indices)):
        pts = probe.pts[k]
        j = pos_of_pts[pts]
        n = bisect.bisect_right(keys, j) - 1
        # an open-GOP leading frame (pts before its keyframe's) may reference the previous GOP
        while n >= 0 and probe.dec_pts[keys[n]] > pts:  # type: ignore[operator]
            n -= 1
        if n < 0:
            return None
        first = keys[n]
        spans[first] = max(spans.get(first, first), j)
    ranges: list[_Range] = []
    for first in sorted(spans):
        last = spans[first]
        if ranges and first <= ranges[-1].last + 1:  # overlapping or adjacent: one pass
            ranges[-1] = _Range(ranges[-1].first, max(ranges[-1].last, last))
        else:
            ranges.append(_Range(first, last))
    return ranges


def _split_ranges(ranges: list[_Range], workers: int) -> list[list[_Range]]:
    """Consecutive groups of `ranges` with about equal packet counts, at most `workers` groups."""
    total = sum(r.packets for r in ranges)
    groups: list[list[_Range]] = [[] for _ in range(workers)]
    done = 0
    for r in ranges:
        # the group whose share of the packets this range's midpoint falls in
        g = min(workers - 1, int((done + r.packets / 2) * workers / total))
        groups[g].append(r)
        done += r.packets
    return [g for g in groups if g]


class _IndexMismatch(Exception):
    """The container did not behave as its index said (seek past a keyframe, unknown packet)."""


class _NoPts(Exception):
    """A frame without pts came out while frames were being skipped: redo the pass without skipping."""


class _FrameSink:
    """Where decoded frames go: the wanted ones are converted (and resized) into `out`."""

    def __init__(self, probe: _Probe, wanted_idx: list[int], resize_to: int | None) -> None:
        self.probe = probe
        self.resize_to = resize_to
        h, w = (resize_to, resize_to) if resize_to else (probe.height, probe.width)
        self.out = np.empty((len(wanted_idx), h, w, 3), dtype=np.uint8)
        self.slot_of = {k: n for n, k in enumerate(wanted_idx)}
        pts = probe.pts
        self.slot_of_pts = {pts[k]: n for n, k in enumerate(wanted_idx)} if pts is not None else {}
        self.filled = np.zeros(len(wanted_idx), dtype=bool)

    def take(self, frame, slot: int) -> None:
        if self.filled[slot]:
            return
        if frame.width != self.probe.width or frame.height != self.probe.height:
            raise PreprocessError(INVALID_VIDEO, "The video changes frame size midway.")
        rgb = frame.to_ndarray(format="rgb24")
        self.out[slot] = _resize(rgb, self.resize_to, self.resize_to) if self.resize_to else rgb
        self.filled[slot] = True


def _open_stream(data: bytes, threads: int):
    import av

    c = av.open(io.BytesIO(data), mode="r")
    s = c.streams.video[0]
    cc = s.codec_context
    cc.thread_type = "AUTO" if threads != 1 else "SLICE"
    cc.thread_count = threads
    return c, s, cc


def _effective_threads(threads: int) -> int:
    """`threads`, or the CPUs this process may use when 0 (at most MAX_AUTO_THREADS)."""
    if threads > 0:
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_AUTO_THREADS)


def _decode_ranges(data: bytes, probe: _Probe, ranges: list[_Range], sink: _FrameSink,
                   threads: int) -> int:
    """Decode each range (step 3 of the module docstring) into `sink`; returns packets decoded.

    Raises _IndexMismatch when the container disagrees with the probe's index.
    """
    skip_ok = probe.codec in _SKIP_NONREF_CODECS
    wanted_pts = sink.slot_of_pts
    id_attr, ids = _packet_ids(probe)  # type: ignore[misc] - _plan_ranges checked it
    pos_of_id = {d: j for j, d in enumerate(ids)}
    sent = 0

    def collect(frames) -> None:
        for frame in frames:
            if frame.pts is None:  # cannot tell which frame it is
                raise _IndexMismatch
            slot = wanted_pts.get(frame.pts)
            if slot is not None:
                sink.take(frame, slot)

    c, s, cc = _open_stream(data, threads)
    with c:
        packets = None
        nxt: int | None = 0  # decode-order index of the next packet `packets` yields (None: unknown)
        for r in ranges:
            if packets is None or nxt is None or r.first - nxt >= SEEK_MIN_GAP_PACKETS:
                # backward seek to the keyframe's dts (its pts when dts is unset): it lands on that
                # keyframe or an earlier one (mov indexes dts, matroska pts >= dts); packets
                # before the keyframe are demuxed, not decoded
                dts, pts = probe.dec_dts[r.first], probe.dec_pts[r.first]
                c.seek(dts if dts is not None else pts, stream=s, backward=True)  # type: ignore[arg-type]
                packets, nxt = c.demux(s), None
            started = reached = False
            for p in packets:
                if p.size == 0:
                    continue
                j = pos_of_id.get(getattr(p, id_attr), -1)
                if j < 0 or (nxt is not None and j != nxt) or (j > r.first and not started):
                    raise _IndexMismatch  # an unknown packet, another order, or a seek past the keyframe
                nxt = j + 1
                if j < r.first:
                    continue
                started = True
                if skip_ok:
                    cc.skip_frame = "DEFAULT" if p.pts in wanted_pts else "NONREF"
                collect(cc.decode(p))
                sent += 1
                if j == r.last:
                    reached = True
                    break
            if not reached:
                raise _IndexMismatch  # the file ended before the range did
            collect(cc.decode(None))  # drain: the range's last frames leave the reorder buffer
            cc.flush_buffers()  # ready for the next keyframe
    return sent


def _pyav_decode_ranges(data: bytes, probe: _Probe, indices: Sequence[int], resize_to: int | None,
                        threads: int, parallel: bool = True) -> tuple[np.ndarray, int] | None:
    """The sampled frames [T, H, W, 3] through `_plan_ranges` + `_decode_ranges`, and the number of
    packets decoded; None when the index cannot be trusted (then decode sequentially).

    parallel: decode ranges on worker threads (one single-threaded decoder each) when there are
    several ranges and more than one thread; else one decoder with FFmpeg's threading.
    """
    ranges = _plan_ranges(probe, indices)
    if ranges is None:
        return None
    wanted_idx = sorted(set(indices))
    sink = _FrameSink(probe, wanted_idx, resize_to)
    workers = min(_effective_threads(threads), len(ranges)) if parallel else 1
    try:
        if workers <= 1:
            sent = _decode_ranges(data, probe, ranges, sink, threads)
        else:
            groups = _split_ranges(ranges, workers)
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="video-decode") as pool:
                jobs = [pool.submit(_decode_ranges, data, probe, g, sink, 1) for g in groups]
                sent = sum(j.result() for j in jobs)
    except _IndexMismatch:
        return None
    if not sink.filled.all():  # a sampled frame never came out: do not guess
        return None
    out = sink.out
    return (out[[sink.slot_of[k] for k in indices]] if list(indices) != wanted_idx else out), sent


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


class VideoDecoderUnavailable(RuntimeError):
    """The configured video decoder cannot run on this machine (a deployment error, not a user's)."""


def check_video_decoder(decoder: str) -> None:
    """Raise `VideoDecoderUnavailable` (one line) unless `decoder` can run here; call it at startup.

    ``"cpu"`` always can; ``"nvdec"`` needs an NVIDIA GPU visible to PyTorch and torchcodec.
    """
    if decoder == CPU_DECODER:
        return
    if decoder != NVDEC_DECODER:
        raise ValueError(f"video decoder must be one of {', '.join(VIDEO_DECODERS)}, got {decoder!r}")
    try:
        import torch
        import torchcodec.decoders  # noqa: F401 - only checking it is there
    except ImportError:
        raise VideoDecoderUnavailable(
            "video decoder 'nvdec' needs an NVIDIA GPU and torchcodec (pip install torchcodec, "
            "with a CUDA build of torch); torchcodec is not installed") from None
    if not torch.cuda.is_available():
        raise VideoDecoderUnavailable(
            "video decoder 'nvdec' needs an NVIDIA GPU and torchcodec; torch sees no CUDA device")


def _nvdec_decode(data: bytes, indices: Sequence[int], resize_to: int | None) -> np.ndarray:
    """NVDEC through torchcodec: frames `indices` (pts order, torchcodec's exact seek mode) as uint8
    [T, H, W, 3] on the host. Not bit-identical to the CPU path (NVIDIA's YUV → RGB); never run
    in this project's CI (no GPU)."""
    check_video_decoder(NVDEC_DECODER)
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(data, device="cuda", dimension_order="NHWC", seek_mode="exact")
    frames = dec.get_frames_at(indices=list(indices)).data.cpu().numpy()
    if resize_to:
        frames = np.stack([_resize(f, resize_to, resize_to) for f in frames])
    return frames


def decode_video(data: bytes, fps: float | None = None, num_frames: int | None = None,
                 resize_to: int | None = None, threads: int = 0,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
                 decoder: str = CPU_DECODER) -> VideoFrames:
    """Decode only the sampled frames of an encoded video (MP4 / MOV / WEBM / anything FFmpeg reads).

    Args:
        data: the encoded file.
        fps, num_frames: the sampling request (see `sample_indices`); both None means 2 fps.
        resize_to: if set, each frame is resized to ``resize_to``² right after decoding (Pillow
            bicubic, the same as `frames_to_tiles` does), so a long clip never holds full frames.
        threads: decoder threads in all (0 = one per CPU this process may use).
        max_frame_pixels: reject larger frames before decoding.
        decoder: ``"cpu"`` (PyAV, bit-exact; default) or ``"nvdec"`` (GPU, see `check_video_decoder`).

    Returns:
        `VideoFrames`.

    Raises:
        PreprocessError: ``invalid_video`` (unreadable) or ``invalid_video_sampling``.
        VideoDecoderUnavailable: ``decoder="nvdec"`` on a machine without GPU or torchcodec.
    """
    if decoder not in VIDEO_DECODERS:
        raise ValueError(f"video decoder must be one of {', '.join(VIDEO_DECODERS)}, got {decoder!r}")
    if decoder == NVDEC_DECODER:
        check_video_decoder(decoder)  # before touching the data: a deployment error comes first
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise PreprocessError(INVALID_VIDEO, "The video is empty.")
    data = bytes(data)
    try:
        probe = _pyav_probe(data)
    except PreprocessError:
        raise
    except Exception:  # noqa: BLE001 - PyAV cannot read it: try decord
        if decoder == NVDEC_DECODER:
            raise PreprocessError(INVALID_VIDEO, "The video could not be decoded.") from None
        return _decord_decode(data, fps, num_frames, resize_to, max_frame_pixels)
    if probe.width * probe.height > max_frame_pixels:
        raise PreprocessError(INVALID_VIDEO, "The video frames are too large.")
    if probe.total_frames == 0 or probe.source_fps <= 0:
        raise PreprocessError(INVALID_VIDEO, "The video has no decodable frames or no frame rate.")
    idx = sample_indices(probe.total_frames, probe.source_fps, fps=fps, num_frames=num_frames)
    if decoder == NVDEC_DECODER:
        try:
            frames = _nvdec_decode(data, idx, resize_to)
        except VideoDecoderUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure means an unreadable video
            raise PreprocessError(INVALID_VIDEO, "The video could not be decoded.") from e
        return VideoFrames(frames=frames, indices=idx, source_fps=probe.source_fps,
                           timestamps=frame_timestamps(idx, probe.source_fps),
                           total_frames=probe.total_frames)
    try:
        ranged = _pyav_decode_ranges(data, probe, idx, resize_to, threads)
        if ranged is not None:
            frames = ranged[0]
        else:  # the index cannot be trusted: one sequential pass
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
                     threads: int = 0, decoder: str = CPU_DECODER) -> VideoTiles:
    """Bytes → one normalized tile per sampled frame (docs/model.md §3.2). Raises PreprocessError
    (and `VideoDecoderUnavailable` for ``decoder="nvdec"`` without a GPU)."""
    vf = decode_video(data, fps=fps, num_frames=num_frames, resize_to=tile, threads=threads,
                      decoder=decoder)
    return VideoTiles(pixel_values=frames_to_tiles(vf.frames, mean, std, tile), indices=vf.indices,
                      timestamps=vf.timestamps, source_fps=vf.source_fps, total_frames=vf.total_frames)
