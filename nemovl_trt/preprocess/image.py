"""Image decoding and InternVL-style dynamic tiling (docs/model.md §2).

Reference definition (what "exact" means here)
-----------------------------------------------
The reference is the original vLLM / SGLang processor path, restated in our own words:

1. ``PIL.Image.open(bytes).convert("RGB")`` (alpha dropped, not composited; palette / gray / CMYK
   converted by Pillow; no EXIF rotation).
2. Grid ``(cols, rows)`` from `tile_grid` (candidate grids sorted by area, closest aspect ratio,
   the tie/area rule).
3. ``img.resize((tile·cols, tile·rows), Image.BICUBIC)``, then ``tile×tile`` crops in row-major
   order; when ``cols·rows > 1`` and ``use_thumbnail``, ``img.resize((tile, tile), Image.BICUBIC)``
   of the *original* image is appended last.
4. Per channel, in float32: ``((x / 255) − mean) / std`` (torchvision ``ToTensor`` + ``Normalize``
   arithmetic: every step rounded to float32).

The fast path below produces bit-identical float32 tensors:

* JPEG (YCbCr or grayscale) is decoded with simplejpeg (libjpeg-turbo, accurate DCT, smooth
  upsampling — ``fastdct=False, fastupsample=False``). On generated JPEGs of several sizes, at
  4:4:4 / 4:2:2 / 4:2:0 subsampling, baseline and progressive, q 75/95, plus grayscale, it gave the
  same RGB bytes as Pillow's decoder (max abs difference 0). CMYK / YCCK JPEGs differ by 1 level in
  Pillow's CMYK→RGB conversion, so those (and PNG / WEBP) go through Pillow itself.
* The fast JPEG path decodes to RGBX (4 bytes per pixel), which Pillow wraps without a copy for
  the resizes (Pillow resamples each channel on its own, so R, G, B are the same as for an RGB
  image); X is ignored.
* When the grid's pixel size equals the image size, the resize is skipped (Pillow returns a copy).
* Resize (when numba is installed; issue 17): Pillow's bicubic resize is restated as integer
  kernels compiled by numba (`_bicubic_coeffs` reproduces Pillow's fixed-point weights double for
  double; the passes do Pillow's integer sums, rounding, clamping and pass order). It is bit-exact
  with Pillow — checked by the tests on random sizes and images, and once per process against the
  installed Pillow (`_fast_path_ok`), falling back to Pillow's own resize on any difference, when
  numba is missing, or with ``NEMOVL_IMAGE_KERNELS=pillow``.
* Normalization is a float32 lookup table per channel: ``((v / 255) − mean) / std`` for the 256
  values of v, computed with the same float32 operations in the same order as the reference, so a
  lookup is the reference's value (checked bit for bit by the tests), written straight into the
  CHW tiles. (Without numba: uint8→float32, then in place ``/255``, ``−mean``, ``/std`` in row blocks.)
* Threads (numba kernels and simplejpeg release the GIL): the output is allocated and its pages
  faulted on a worker while this thread decodes; then the thumbnail and the grid are cut into bands
  of output rows, each task resizing one band and normalizing it into its tiles, and this thread and
  a worker share the tasks (one wait per image). Several images of one request are processed side
  by side, one per worker (`preprocess_images`).

Cost (2048×1536 JPEG → 13 tiles, CPU time per stage, shared 2-core machine): decode ≈ 14 ms;
with the kernels: thumbnail horizontal pass ≈ 7.5 ms, vertical ≈ 1.5 ms, normalization of 13 tiles
(40 MB of float32, memory-bound) ≈ 5.5 ms plus ≈ 6 ms of first-touch page faults (moved onto a
worker during the decode); with Pillow + numpy: thumbnail ≈ 22 ms, normalization ≈ 19 ms. Whole
path: ≈ 36 ms of CPU, ≈ 23 ms of it on the calling thread (1.6× the decode), vs ≈ 57 ms before. Splitting Pillow's resize into row bands with ``box=``
is *not* bit-exact (the band's coordinates change the weights' rounding); splitting our kernels by
output rows is, since every output row has its own weights. Dropped as not exact: DCT-scaled
decoding before the thumbnail resize (Pillow ``draft`` to 1024×768: up to 6 levels off on 59 % of
the thumbnail's values), torch's antialiased bicubic (off by 1 on 40 of 786 432 values; its weights
are 16-bit), OpenCV's INTER_CUBIC (another filter, a = −0.75, no antialiasing).

Decompression bombs: the size is read from the header first (simplejpeg's JPEG header, the PNG
IHDR chunk, the WEBP VP8X / VP8 / VP8L header; lazy ``Image.open`` otherwise) and images over
``max_pixels`` are rejected with ``image_too_large`` before any pixel is decoded.
"""

from __future__ import annotations

import functools
import io
import math
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from nemovl_trt.preprocess.errors import (
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    INVALID_IMAGE,
    INVALID_PARAMETER,
    PreprocessError,
)

MIN_IMAGE_SIDE = 32  # docs/api.md: smaller than 32×32 gives 400
DEFAULT_MAX_PIXELS = 50_000_000  # decompression-bomb cap; the server may pass its own
MAX_NUM_TILES_LIMIT = 12  # docs/api.md / NIM: mm_processor_kwargs.max_num_tiles in 1..12

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_FAST_JPEG_COLORSPACES = frozenset({"YCbCr", "Gray"})  # checked pixel-identical to Pillow

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
# Worker threads for the thumbnail and half of the grid tiles (jobs never wait on the pool themselves,
# so there is no deadlock); Pillow and numpy release the GIL in this work.
_POOL_WORKERS = max(1, min(4, os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="nemovl-pre")
        return _POOL


# --------------------------------------------------------------------------------------------- grid
def _candidate_grids(max_num_tiles: int, min_num_tiles: int = 1) -> list[tuple[int, int]]:
    """All (cols, rows) with min ≤ cols·rows ≤ max, sorted by area (stable over set order, docs/model.md §2.2)."""
    grids = {
        (i, j)
        for n in range(min_num_tiles, max_num_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num_tiles <= i * j <= max_num_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def _check_max_num_tiles(max_num_tiles: int) -> None:
    if isinstance(max_num_tiles, bool) or not isinstance(max_num_tiles, int) or not (
        1 <= max_num_tiles <= MAX_NUM_TILES_LIMIT
    ):
        raise PreprocessError(INVALID_PARAMETER,
                              f"max_num_tiles must be an integer from 1 to {MAX_NUM_TILES_LIMIT}, "
                              f"got {max_num_tiles!r}.", param="max_num_tiles")


def tile_grid(width: int, height: int, max_num_tiles: int, tile: int = 512) -> tuple[int, int]:
    """The tile grid (cols, rows) for a `width`×`height` image (docs/model.md §2.2–2.3).

    Closest aspect ratio ``cols/rows`` to ``width/height``; on an exact tie a later (larger) grid
    wins only if ``width·height > 0.5·tile²·cols·rows``. `tile` is the checkpoint's
    ``force_image_size`` (512).
    """
    _check_max_num_tiles(max_num_tiles)
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(max_num_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, max_num_tiles: int, tile: int = 512,
              use_thumbnail: bool = True) -> int:
    """Tiles the image becomes: cols·rows, plus one thumbnail when cols·rows > 1."""
    cols, rows = tile_grid(width, height, max_num_tiles, tile)
    n = cols * rows
    return n + 1 if (use_thumbnail and n > 1) else n


# ------------------------------------------------------------------------------------------- decode
def sniff_image_format(data: bytes) -> str:
    """``"jpeg"``, ``"png"`` or ``"webp"`` from the magic bytes; anything else → ``invalid_image``."""
    if data[:3] == _JPEG_MAGIC:
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise PreprocessError(INVALID_IMAGE, "The image is not a JPEG, PNG or WEBP file.")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise PreprocessError(IMAGE_TOO_LARGE,
                              f"The image is {width}x{height} pixels, more than the limit of "
                              f"{max_pixels} pixels.")
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise PreprocessError(IMAGE_TOO_SMALL,
                              f"The image is {width}x{height} pixels; both sides must be at least "
                              f"{MIN_IMAGE_SIDE}.")


def _container_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read from the PNG IHDR / WEBP VP8X, VP8, VP8L header; None if unreadable."""
    try:
        if fmt == "png" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return int(w), int(h)
        if fmt == "webp":
            kind = data[12:16]
            if kind == b"VP8X":
                return (1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little"))
            if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if kind == b"VP8L" and data[20] == 0x2F:
                bits = int.from_bytes(data[21:25], "little")
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if fmt == "jpeg":
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(w), int(h)
    except (ValueError, RuntimeError, struct.error, IndexError):
        return None
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only, without decoding pixels."""
    fmt = sniff_image_format(data)
    size = _container_size(data, fmt)
    if size is not None:
        return size
    return _open_pil(data, max_pixels=None).size


def _open_pil(data: bytes, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise PreprocessError(IMAGE_TOO_LARGE, "The image has too many pixels.") from e
    except Exception as e:  # noqa: BLE001 - any Pillow failure means "not a readable image"
        raise PreprocessError(INVALID_IMAGE, "The image could not be decoded.") from e
    if max_pixels is not None:
        _check_size(img.size[0], img.size[1], max_pixels)
    return img


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode JPEG / PNG / WEBP bytes to RGB.

    Args:
        data: the encoded file; the format is sniffed from the bytes.
        max_pixels: reject images with more pixels (checked from the header, before decoding).

    Returns:
        uint8 array ``[H, W, 3]`` (C-contiguous), identical to ``Image.open(...).convert("RGB")``.

    Raises:
        PreprocessError: ``invalid_image``, ``image_too_small`` or ``image_too_large``.
    """
    return _decode(data, max_pixels, rgbx=False)


def _decode(data: bytes, max_pixels: int, rgbx: bool) -> np.ndarray:
    """`decode_image`; with ``rgbx`` the fast JPEG path returns ``[H, W, 4]`` RGBX (X unused), which
    Pillow can wrap without a copy (its RGB images are stored as 4 bytes per pixel anyway)."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise PreprocessError(INVALID_IMAGE, "The image is empty.")
    data = bytes(data)
    fmt = sniff_image_format(data)
    if fmt == "jpeg":
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except (ValueError, RuntimeError):
            colorspace = None
        if colorspace in _FAST_JPEG_COLORSPACES:
            _check_size(int(w), int(h), max_pixels)
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGBX" if rgbx else "RGB", fastdct=False,
                                              fastupsample=False, strict=True)
            except (ValueError, RuntimeError) as e:
                raise PreprocessError(INVALID_IMAGE, "The JPEG image is corrupt or truncated.") from e
    size = _container_size(data, fmt)
    if size is not None:
        _check_size(size[0], size[1], max_pixels)
    img = _open_pil(data, max_pixels)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated PNG / WEBP: the first frame
        rgb = img.convert("RGB")
        rgb.load()
    except PreprocessError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PreprocessError(INVALID_IMAGE, "The image is corrupt or truncated.") from e
    return np.asarray(rgb)


# ------------------------------------------------------------------------------------ normalization
_ROW_BLOCK = 64  # rows per normalization block: keeps the three in-place passes in cache


def _normalize_grid_into(rgb: np.ndarray, cols: int, rows: int, tile: int, mean: np.ndarray,
                         std: np.ndarray, out: np.ndarray) -> None:
    """Write the row-major tiles of `rgb` ([rows·tile, cols·tile, 3] uint8) into `out` ([rows·cols,3,t,t]).

    Per block: uint8 → float32 (exact), then ``/255``, ``−mean``, ``/std`` in place, each a float32
    IEEE operation exactly as in the reference (`mean`, `std`: float32 [3, 1, 1]).
    """
    src = rgb.reshape(rows, tile, cols, tile, rgb.shape[-1])[..., :3]
    dst = out.reshape(rows, cols, 3, tile, tile)
    scale = np.float32(255.0)
    for r in range(rows):
        for q in range(cols):
            for y0 in range(0, tile, _ROW_BLOCK):
                d = dst[r, q, :, y0:y0 + _ROW_BLOCK]
                np.copyto(d, src[r, y0:y0 + _ROW_BLOCK, q].transpose(2, 0, 1), casting="unsafe")
                np.divide(d, scale, out=d)
                np.subtract(d, mean, out=d)
                np.divide(d, std, out=d)


def _mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(mean, dtype=np.float32).reshape(3, 1, 1),
            np.asarray(std, dtype=np.float32).reshape(3, 1, 1))


def _as_pil(rgb: np.ndarray) -> Image.Image:
    """A Pillow image of uint8 [H, W, 3] (copied) or contiguous [H, W, 4] RGBX (shared, no copy)."""
    if rgb.shape[-1] == 4 and rgb.flags.c_contiguous:
        return Image.frombuffer("RGBX", (rgb.shape[1], rgb.shape[0]), rgb, "raw", "RGBX", 0, 1)
    return Image.fromarray(np.ascontiguousarray(rgb[..., :3]))


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow bicubic resize of [H, W, 3|4] uint8 (channels resampled independently, so RGBX gives
    the same RGB values as RGB)."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb  # Pillow's resize to the same size is a plain copy
    return np.asarray(_as_pil(rgb).resize((width, height), Image.Resampling.BICUBIC))


# ------------------------------------------------------------------ exact bicubic kernels (numba)
# Pillow's 8-bit bicubic resize (src/libImaging/Resample.c, python-pillow/Pillow; read at commit
# 01f132fb086af790cbd67cfb0ad9aaac607ef567 and checked against the installed Pillow by the tests and
# by `_fast_path_ok`), restated: per axis, for output index i, center = (i + 0.5)·scale, taps
# [xmin, xmin + n) around it, weights bicubic(a = −0.5) of ((tap − center + 0.5) / max(scale, 1)),
# normalised by their sequential double sum and rounded to fixed point with 22 fractional bits;
# every pass accumulates ``2^21 + Σ pixel·weight`` in integers, shifts by 22 and clamps to 0..255
# (an 8-bit intermediate between the passes). Pillow runs the vertical pass first when the height
# shrinks and ``(H − h) > 2·(W − w)``, else the horizontal pass first (measured on Pillow 13.0.0 over
# random sizes; the order changes the rounding of the intermediate, so it is part of "exact").
# The kernels below do the same integer arithmetic, vectorised by LLVM (4 channels per pixel, RGBX).
_PRECISION_BITS = 22  # Pillow: 32 − 8 − 2 (8 bits of result, 2 of headroom for negative lobes)
_BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5
_HPASS_ROWS = 32  # rows per transposed block in hpass (32·W·4 bytes: 256 KiB at W = 2048, in L2)
_HPASS_CHUNK = 16  # columns per transposition step (16 × 32 × 4 B, in L1)
_BANDS = 4  # row bands of one `_resize_exact` when parallel (work sharing over two threads)
_THUMB_BANDS = 2  # thumbnail bands: one per thread, the largest tasks, taken first
_GRID_BANDS_PER_ROW = 2  # grid bands per tile row: small tasks that even out the two threads
_FAST_ENV = "NEMOVL_IMAGE_KERNELS"  # "pillow" forces the plain Pillow path (the kernels stay unused)


@functools.lru_cache(maxsize=64)
def _bicubic_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's fixed-point bicubic weights for resizing one axis from `in_size` to `out_size`.

    Returns ``(first, count, weights)``: int32 [out], int32 [out], int32 [out, ksize]; output i
    reads inputs ``first[i] .. first[i] + count[i] − 1`` with ``weights[i, :count[i]]`` (scaled by
    2^22). Every float64 operation is the one Pillow does, one numpy op each (no fused multiply-add,
    no pairwise sums), so the doubles and hence the rounded integers are the same.
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inv = 1.0 / filterscale
    first = np.maximum(np.trunc(center - support + 0.5), 0.0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    valid = taps[None, :] < count[:, None]
    x = np.abs(((taps[None, :] + first[:, None]).astype(np.float64) - center[:, None] + 0.5) * inv)
    near = ((_BICUBIC_A + 2.0) * x - (_BICUBIC_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _BICUBIC_A
    w = np.where(valid, np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0)), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # sequential sum, tap by tap, as in C
        total = total + w[:, k]
    nonzero = total != 0.0
    w = np.where(nonzero[:, None], w / np.where(nonzero, total, 1.0)[:, None], w)
    fixed = w * float(1 << _PRECISION_BITS)
    weights = np.where(w < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed))
    return first.astype(np.int32), count.astype(np.int32), np.where(valid, weights, 0).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _norm_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [3, 256]: ``((v / 255) − mean[c]) / std[c]`` for every uint8 v, each step a float32
    IEEE operation in the reference's order, so a lookup gives the reference's exact values."""
    v = np.arange(256, dtype=np.float32)[None, :]
    m, s = _mean_std(mean, std)
    lut = (v / np.float32(255.0) - m[:, :, 0]) / s[:, :, 0]
    lut.setflags(write=False)
    return lut


def _define_kernels():  # noqa: ANN202 - numba dispatchers, or None without numba
    """(hpass, vpass, normalize), compiled on first call (or loaded from numba's on-disk cache).
    numba is optional and imported only here (it costs ≈ 0.5 s to import)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    njit = numba.njit(nogil=True, cache=True, boundscheck=False)
    half = 1 << (_PRECISION_BITS - 1)
    shift = _PRECISION_BITS
    block = _HPASS_ROWS
    lanes = 4 * _HPASS_ROWS
    chunk = _HPASS_CHUNK

    @njit
    def hpass(src32, row0, first, count, weights, dst):  # noqa: ANN001, ANN202
        # dst[r, o, :] = clip8((2^21 + Σ_k src[row0 + r, first[o] + k, :] · w[o, k]) >> 22), src32 being
        # the RGBX rows as uint32 [H, W]. Blocks of `block` rows are first transposed into `buf`
        # ([W, block·4] bytes, in column chunks to stay in cache) so that the multiply-adds run over
        # `lanes` contiguous values with a trip count known at compile time (SIMD), as in vpass. The
        # lanes of a last, partial block hold stale rows: computed and dropped.
        width = src32.shape[1]
        buf32 = np.zeros((width, block), dtype=np.uint32)
        buf = buf32.view(np.uint8).reshape(width, lanes)
        acc = np.empty(lanes, dtype=np.int32)
        for b0 in range(0, dst.shape[0], block):
            nb = min(block, dst.shape[0] - b0)
            for x0 in range(0, width, chunk):
                x1 = min(x0 + chunk, width)
                for r in range(nb):
                    line = src32[row0 + b0 + r]
                    for x in range(x0, x1):
                        buf32[x, r] = line[x]
            for o in range(dst.shape[1]):
                for j in range(lanes):
                    acc[j] = half
                m = first[o]
                for k in range(count[o]):
                    c = weights[o, k]
                    column = buf[m + k]
                    for j in range(lanes):
                        acc[j] += np.int32(column[j]) * c
                for r in range(nb):
                    for ch in range(4):
                        dst[b0 + r, o, ch] = min(max(acc[r * 4 + ch] >> shift, 0), 255)

    @njit
    def vpass(src, row_off, first, count, weights, o0, dst):  # noqa: ANN001, ANN202
        # src, dst: [rows, W·4] views; dst[i] = clip8(2^21 + Σ_k src[first[o0+i] − row_off + k] · w)
        n = dst.shape[1]
        acc = np.empty(n, dtype=np.int64)
        for i in range(dst.shape[0]):
            o = o0 + i
            for x in range(n):
                acc[x] = half
            for k in range(count[o]):
                c = weights[o, k]
                line = src[first[o] - row_off + k]
                for x in range(n):
                    acc[x] += line[x] * c
            for x in range(n):
                dst[i, x] = min(max(acc[x] >> shift, 0), 255)

    @njit
    def normalize(src, y_start, cols, tile, lut, out):  # noqa: ANN001, ANN202
        # src: uint8 [n, cols·tile, 4], rows y_start .. y_start + n of an image cut into row-major
        # tile×tile tiles; writes those rows of every tile they cross into out [tiles, 3, tile, tile]
        # as lut[c, value] (float32, CHW)
        for i in range(src.shape[0]):
            y = y_start + i
            tile_row = y // tile
            ty = y - tile_row * tile
            line = src[i]
            for q in range(cols):
                t = tile_row * cols + q
                x0 = q * tile
                for x in range(tile):
                    out[t, 0, ty, x] = lut[0, line[x0 + x, 0]]
                    out[t, 1, ty, x] = lut[1, line[x0 + x, 1]]
                    out[t, 2, ty, x] = lut[2, line[x0 + x, 2]]

    return hpass, vpass, normalize


_KERNELS = None  # (hpass, vpass, normalize) once `_fast_path_ok` has built and checked them


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """`n` items in ≤ `parts` contiguous (start, stop) ranges of near-equal size."""
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts) if edges[i + 1] > edges[i]]


def _run_tasks(tasks: list[Callable[[], object]], parallel: bool) -> None:
    """Run independent `tasks`; when `parallel`, this thread and one worker take them in turn from a
    shared list (work sharing, so uneven tasks still balance over the two)."""
    if not parallel or len(tasks) < 2 or _POOL_WORKERS < 2:
        for t in tasks:
            t()
        return
    nxt = iter(range(len(tasks)))
    lock = threading.Lock()

    def loop() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            tasks[i]()

    future = _pool().submit(loop)
    loop()
    if not future.cancel():  # a worker busy elsewhere never started it: nothing left to wait for
        future.result()


def _resize_band(rgbx: np.ndarray, width: int, height: int, o0: int, o1: int,
                 dst: np.ndarray | None = None) -> np.ndarray:
    """Rows ``o0 .. o1`` of Pillow's ``resize((width, height), BICUBIC)`` of RGBX uint8 [H, W, 4]
    (C-contiguous), bit for bit: uint8 [o1 − o0, width, 4], written into `dst` when given.

    Every output row has its own weights, so bands are independent and any split is exact; with the
    horizontal pass first, a band resamples the input rows its vertical taps read (neighbouring bands
    recompute the few rows they share, ≈ 2 × support, with the same result)."""
    hpass, vpass, _ = _KERNELS
    in_h, in_w = rgbx.shape[:2]
    n = o1 - o0
    need_h, need_v = width != in_w, height != in_h
    if not (need_h or need_v) and dst is None:
        return rgbx[o0:o1]  # a view: Pillow's same-size resize is a copy of the same pixels
    if dst is None:
        dst = np.empty((n, width, 4), dtype=np.uint8)
    src32 = rgbx.view(np.uint32).reshape(in_h, in_w)
    if not need_v:
        if not need_h:
            dst[...] = rgbx[o0:o1]
        else:
            xf, xc, xw = _bicubic_coeffs(in_w, width)
            hpass(src32, o0, xf, xc, xw, dst)
        return dst
    yf, yc, yw = _bicubic_coeffs(in_h, height)
    if not need_h:
        vpass(rgbx.reshape(in_h, in_w * 4), 0, yf, yc, yw, o0, dst.reshape(n, width * 4))
        return dst
    xf, xc, xw = _bicubic_coeffs(in_w, width)
    if in_h >= height and (in_h - height) > 2 * (in_w - width):  # Pillow's pass order: vertical first
        tmp = np.empty((n, in_w, 4), dtype=np.uint8)
        vpass(rgbx.reshape(in_h, in_w * 4), 0, yf, yc, yw, o0, tmp.reshape(n, in_w * 4))
        hpass(tmp.view(np.uint32).reshape(n, in_w), 0, xf, xc, xw, dst)
        return dst
    r0 = int(yf[o0:o1].min())  # input rows the band's vertical taps read
    r1 = int((yf[o0:o1] + yc[o0:o1]).max())
    tmp = np.empty((r1 - r0, width, 4), dtype=np.uint8)
    hpass(src32, r0, xf, xc, xw, tmp)
    vpass(tmp.reshape(r1 - r0, width * 4), r0, yf, yc, yw, o0, dst.reshape(n, width * 4))
    return dst


def _resize_exact(rgbx: np.ndarray, width: int, height: int, parallel: bool = False) -> np.ndarray:
    """Pillow's ``resize((width, height), BICUBIC)`` of RGBX uint8 [H, W, 4], bit for bit, with the
    kernels. Returns uint8 [height, width, 4] (RGB in the first three channels)."""
    rgbx = np.ascontiguousarray(rgbx)
    if rgbx.shape[:2] == (height, width):
        return rgbx
    out = np.empty((height, width, 4), dtype=np.uint8)
    par = parallel and _POOL_WORKERS > 1
    _run_tasks([functools.partial(_resize_band, rgbx, width, height, a, b, out[a:b])
                for a, b in _split(height, _BANDS if par else 1)], par)
    return out


def _as_rgbx(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] with RGB in the first three channels (no copy when already RGBX)."""
    if rgb.shape[-1] == 4:
        return rgb
    out = np.empty(rgb.shape[:2] + (4,), dtype=np.uint8)
    out[..., :3] = rgb
    out[..., 3] = 0
    return out


def _tiles_fast(rgb: np.ndarray, cols: int, rows: int, tile: int, thumb: bool, mean: Sequence[float],
                std: Sequence[float], parallel: bool, out: np.ndarray | None = None) -> np.ndarray:
    """`image_to_tiles` with the kernels. The thumbnail and the grid are cut into bands of output
    rows; each task resizes one band and normalizes it into its tiles, so all tasks are independent:
    this thread and a worker share them (one wait in all), the thumbnail's larger bands first.
    `out`: an already allocated (and page-faulted) float32 result, or None."""
    normalize = _KERNELS[2]
    rgbx = np.ascontiguousarray(_as_rgbx(rgb))  # one array layout: no new compilation at run time
    lut = _norm_lut(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    n_grid = cols * rows
    shape = (n_grid + (1 if thumb else 0), 3, tile, tile)
    if out is None or out.shape != shape or out.dtype != np.float32:
        out = np.empty(shape, dtype=np.float32)
    par = parallel and _POOL_WORKERS > 1

    def job(width: int, height: int, n_cols: int, dst: np.ndarray, a: int, b: int) -> None:
        normalize(_resize_band(rgbx, width, height, a, b), a, n_cols, tile, lut, dst)

    tasks = []
    if thumb:
        tasks += [functools.partial(job, tile, tile, 1, out[n_grid:], a, b)
                  for a, b in _split(tile, _THUMB_BANDS if par else 1)]
    tasks += [functools.partial(job, tile * cols, tile * rows, cols, out[:n_grid], a, b)
              for a, b in _split(tile * rows, _GRID_BANDS_PER_ROW * rows if par else 1)]
    _run_tasks(tasks, par)
    return out


def _touched_empty(shape: tuple[int, ...]) -> np.ndarray:
    """np.empty(shape, float32) with every page written once: the kernel's page faults (zeroing 40 MB
    for 13 tiles, ≈ 6 ms of CPU) are paid here, on a worker while the image is still being decoded."""
    out = np.empty(shape, dtype=np.float32)
    out.reshape(-1)[:: max(1, mmap.PAGESIZE // 4)] = 0.0
    return out


def _prefault_output(data: bytes, max_num_tiles: int, tile: int, use_thumbnail: bool,
                     max_pixels: int) -> Future | None:
    """Start `_touched_empty` for the result of `data` on a worker (size from the header), or None
    when the header can't tell or the image will be rejected anyway."""
    try:
        size = _container_size(data, sniff_image_format(data))
    except PreprocessError:
        return None
    if size is None or size[0] * size[1] > max_pixels or min(size) < MIN_IMAGE_SIDE:
        return None
    n = num_tiles(size[0], size[1], max_num_tiles, tile, use_thumbnail)
    return _pool().submit(_touched_empty, (n, 3, tile, tile))


_FAST_OK: bool | None = None
_FAST_LOCK = threading.Lock()


def _fast_path_ok() -> bool:
    """Whether the kernels are available and give Pillow's pixels here (checked once per process on
    small random images covering both pass orders, up- and down-scaling; numba compiles on first use,
    or loads its on-disk cache)."""
    global _FAST_OK
    if _FAST_OK is None:
        with _FAST_LOCK:
            if _FAST_OK is None:
                _FAST_OK = _self_check()
    return _FAST_OK


def warmup() -> bool:
    """Build (or load from numba's cache) and self-check the exact kernels now, so the first request
    doesn't pay for it (a cold compile takes seconds). Returns True when the kernels are in use,
    False when the Pillow path is (numba missing, a disagreement, or NEMOVL_IMAGE_KERNELS=pillow)."""
    return _fast_path_ok()


def _self_check() -> bool:
    if os.environ.get(_FAST_ENV, "").strip().lower() == "pillow":
        return False
    try:
        return _check_kernels()
    except Exception as e:  # noqa: BLE001 - a compiler / platform failure: keep serving with Pillow
        warnings.warn(f"exact bicubic kernels unavailable ({type(e).__name__}: {e}); using Pillow's resize",
                      RuntimeWarning, stacklevel=3)
        return False


def _check_kernels() -> bool:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _define_kernels()
        if _KERNELS is None:
            return False
    rng = np.random.default_rng(0)
    cases = [((97, 61), (40, 35)), ((61, 97), (70, 30)), ((50, 40), (131, 77)), ((120, 90), (64, 120)),
             ((90, 120), (90, 50)), ((77, 130), (50, 70))]
    for (w, h), (ow, oh) in cases:
        rgbx = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        want = np.asarray(_as_pil(rgbx).resize((ow, oh), Image.Resampling.BICUBIC))[..., :3]
        if not np.array_equal(_resize_exact(rgbx, ow, oh)[..., :3], want):
            warnings.warn("exact bicubic kernels disagree with this Pillow; using Pillow's resize",
                          RuntimeWarning, stacklevel=4)
            return False
    # the normalization kernel too (compiled here rather than on the first request)
    tile, mean, std = 8, (0.5, 0.25, 0.125), (0.5, 0.75, 0.25)
    rgbx = rng.integers(0, 256, (2 * tile, 3 * tile, 4), dtype=np.uint8)
    got = np.empty((6, 3, tile, tile), dtype=np.float32)
    _KERNELS[2](rgbx[:tile], 0, 3, tile, _norm_lut(mean, std), got)  # two bands of rows
    _KERNELS[2](rgbx[tile:], tile, 3, tile, _norm_lut(mean, std), got)
    m, s = _mean_std(mean, std)
    want = np.empty_like(got)
    _normalize_grid_into(rgbx, 3, 2, tile, m, s, want)
    return bool(np.array_equal(got, want))


def image_to_tiles(rgb: np.ndarray, max_num_tiles: int, mean: Sequence[float], std: Sequence[float],
                   tile: int = 512, use_thumbnail: bool = True, parallel: bool = True,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Tile and normalize one RGB image (docs/model.md §2.1–2.8).

    Args:
        rgb: uint8 ``[H, W, 3]`` (or ``[H, W, 4]`` RGBX, the 4th channel ignored).
        max_num_tiles: 1..12.
        mean, std: per-channel normalization (checkpoint ``norm_mean`` / ``norm_std``).
        tile: tile side in pixels (checkpoint ``force_image_size``).
        use_thumbnail: checkpoint ``use_thumbnail``.
        parallel: resize/normalize the thumbnail and half of the grid tiles in worker threads.
        out: optional float32 buffer of the result's shape to write into (used when it matches).

    Returns:
        float32 ``[n, 3, tile, tile]`` with n = `num_tiles`(W, H, max_num_tiles): grid tiles in
        row-major order, then the thumbnail.
    """
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H,W,3] or [H,W,4], got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    cols, rows = tile_grid(width, height, max_num_tiles, tile)
    n_grid = cols * rows
    thumb = use_thumbnail and n_grid > 1
    if _fast_path_ok():
        return _tiles_fast(rgb, cols, rows, tile, thumb, mean, std, parallel, out=out)
    return _tiles_pillow(rgb, cols, rows, tile, thumb, mean, std, parallel)


def _tiles_pillow(rgb: np.ndarray, cols: int, rows: int, tile: int, thumb: bool, mean: Sequence[float],
                  std: Sequence[float], parallel: bool) -> np.ndarray:
    """`image_to_tiles` with Pillow's resize (the path when numba is missing; same output)."""
    n_grid = cols * rows
    m, s = _mean_std(mean, std)
    out = np.empty((n_grid + (1 if thumb else 0), 3, tile, tile), dtype=np.float32)

    def do_thumb() -> None:
        small = _resize(rgb, tile, tile)
        _normalize_grid_into(small, 1, 1, tile, m, s, out[n_grid:])

    if not parallel:
        _normalize_grid_into(_resize(rgb, tile * cols, tile * rows), cols, rows, tile, m, s, out[:n_grid])
        if thumb:
            do_thumb()
        return out
    pool = _pool()
    futures = [pool.submit(do_thumb)] if thumb else []
    resized = _resize(rgb, tile * cols, tile * rows)
    # grid rows split in two: the first half on a worker, the rest here
    half = rows // 2 if (rows > 1 and _POOL_WORKERS > 1) else 0
    if half:
        futures.append(pool.submit(_normalize_grid_into, resized[: half * tile], cols, half, tile, m, s,
                                   out[: half * cols]))
    _normalize_grid_into(resized[half * tile:], cols, rows - half, tile, m, s, out[half * cols:n_grid])
    for f in futures:
        f.result()
    return out


def frames_to_tiles(frames: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    tile: int = 512) -> np.ndarray:
    """Video frames uint8 [T, H, W, 3] → float32 [T, 3, tile, tile]: each frame resized to one tile
    (bicubic, aspect ratio not kept, no thumbnail; docs/model.md §3.2) and normalized like an image."""
    m, s = _mean_std(mean, std)
    out = np.empty((frames.shape[0], 3, tile, tile), dtype=np.float32)
    for t in range(frames.shape[0]):
        _normalize_grid_into(_resize(np.ascontiguousarray(frames[t]), tile, tile), 1, 1, tile, m, s,
                             out[t:t + 1])
    return out


@dataclass(frozen=True)
class ImageTiles:
    """One preprocessed image: ``pixel_values`` float32 [num_tiles, 3, tile, tile] and its size."""

    pixel_values: np.ndarray
    num_tiles: int
    width: int
    height: int


def preprocess_image(data: bytes, max_num_tiles: int, mean: Sequence[float], std: Sequence[float],
                     tile: int = 512, use_thumbnail: bool = True,
                     max_pixels: int = DEFAULT_MAX_PIXELS, parallel: bool = True) -> ImageTiles:
    """Bytes → normalized tiles (decode_image + image_to_tiles). Raises PreprocessError."""
    _check_max_num_tiles(max_num_tiles)
    pending = (_prefault_output(data, max_num_tiles, tile, use_thumbnail, max_pixels)
               if (parallel and _POOL_WORKERS > 1 and isinstance(data, bytes) and _fast_path_ok()) else None)
    rgb = _decode(data, max_pixels, rgbx=True)
    # not started yet (the worker is busy elsewhere): cancel it and allocate here instead
    out = None if pending is None or pending.cancel() else pending.result()
    pv = image_to_tiles(rgb, max_num_tiles, mean, std, tile=tile, use_thumbnail=use_thumbnail,
                        parallel=parallel, out=out)
    return ImageTiles(pixel_values=pv, num_tiles=int(pv.shape[0]), width=int(rgb.shape[1]),
                      height=int(rgb.shape[0]))


_IMAGE_POOL: ThreadPoolExecutor | None = None


def _image_pool() -> ThreadPoolExecutor:
    """Workers for whole images of one request; separate from `_pool` (whose jobs an image's own
    thread waits on), so the two never wait on each other."""
    global _IMAGE_POOL
    with _POOL_LOCK:
        if _IMAGE_POOL is None:
            _IMAGE_POOL = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="nemovl-img")
        return _IMAGE_POOL


def preprocess_images(images: Sequence[bytes], max_num_tiles: int, mean: Sequence[float],
                      std: Sequence[float], tile: int = 512, use_thumbnail: bool = True,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[int]]:
    """Several images → (float32 [sum tiles, 3, tile, tile], tiles per image), each tiled independently.

    With several images they are decoded and tiled side by side in worker threads (the JPEG decode
    is single-threaded, so one image per core uses the cores best), each image serially inside;
    the first failing image (in order) raises, as it would serially."""
    def one(d: bytes, parallel: bool = False) -> ImageTiles:
        return preprocess_image(d, max_num_tiles, mean, std, tile, use_thumbnail, max_pixels, parallel=parallel)

    if len(images) > 1 and _POOL_WORKERS > 1:
        parts = list(_image_pool().map(one, images))
    else:
        parts = [one(d, parallel=True) for d in images]
    if not parts:
        return np.zeros((0, 3, tile, tile), dtype=np.float32), []
    return np.concatenate([p.pixel_values for p in parts], axis=0), [p.num_tiles for p in parts]
