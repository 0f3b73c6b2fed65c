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
* Normalization is fused with the HWC→CHW tile layout and done in cache-sized row blocks:
  uint8→float32, then in place ``/255``, ``−mean``, ``/std`` — the same float32 IEEE operations in
  the same order as the reference, so the result is bit-identical (checked by the tests against a
  plain Pillow + numpy computation).
* The thumbnail is resized and normalized in a worker thread, and half of the grid tiles are
  normalized in another, while this thread does the rest (Pillow and numpy release the GIL).

Cost (2048×1536 JPEG → 13 tiles, one quiet core): decode ≈ 26 ms, the exact Pillow bicubic
thumbnail ≈ 35 ms, normalization of 13 tiles (40 MB of float32) ≈ 25 ms. The thumbnail alone
costs more than the decode, so "within 2× of the decode" needs free cores for the thread above.
(Splitting Pillow's resize into row bands with ``box=`` was tried and is *not* bit-exact.)

Decompression bombs: the size is read from the header first (simplejpeg's JPEG header, the PNG
IHDR chunk, the WEBP VP8X / VP8 / VP8L header; lazy ``Image.open`` otherwise) and images over
``max_pixels`` are rejected with ``image_too_large`` before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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


def image_to_tiles(rgb: np.ndarray, max_num_tiles: int, mean: Sequence[float], std: Sequence[float],
                   tile: int = 512, use_thumbnail: bool = True, parallel: bool = True) -> np.ndarray:
    """Tile and normalize one RGB image (docs/model.md §2.1–2.8).

    Args:
        rgb: uint8 ``[H, W, 3]`` (or ``[H, W, 4]`` RGBX, the 4th channel ignored).
        max_num_tiles: 1..12.
        mean, std: per-channel normalization (checkpoint ``norm_mean`` / ``norm_std``).
        tile: tile side in pixels (checkpoint ``force_image_size``).
        use_thumbnail: checkpoint ``use_thumbnail``.
        parallel: resize/normalize the thumbnail and half of the grid tiles in worker threads.

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
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageTiles:
    """Bytes → normalized tiles (decode_image + image_to_tiles). Raises PreprocessError."""
    _check_max_num_tiles(max_num_tiles)
    rgb = _decode(data, max_pixels, rgbx=True)
    pv = image_to_tiles(rgb, max_num_tiles, mean, std, tile=tile, use_thumbnail=use_thumbnail)
    return ImageTiles(pixel_values=pv, num_tiles=int(pv.shape[0]), width=int(rgb.shape[1]),
                      height=int(rgb.shape[0]))


def preprocess_images(images: Sequence[bytes], max_num_tiles: int, mean: Sequence[float],
                      std: Sequence[float], tile: int = 512, use_thumbnail: bool = True,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[int]]:
    """Several images → (float32 [sum tiles, 3, tile, tile], tiles per image), each tiled independently."""
    parts = [preprocess_image(d, max_num_tiles, mean, std, tile, use_thumbnail, max_pixels) for d in images]
    if not parts:
        return np.zeros((0, 3, tile, tile), dtype=np.float32), []
    return np.concatenate([p.pixel_values for p in parts], axis=0), [p.num_tiles for p in parts]
