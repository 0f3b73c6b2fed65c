"""The image tiling path as it was before the exact-kernel rewrite (issue 17): Pillow bicubic resize per
grid and thumbnail, then float32 normalization in row blocks. Kept here, outside the product, as the
reference the new path must match bit for bit (tests/test_preprocess_image.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from nemovl_trt.preprocess.image import tile_grid

_ROW_BLOCK = 64


def _normalize_grid_into(rgb: np.ndarray, cols: int, rows: int, tile: int, mean: np.ndarray,
                         std: np.ndarray, out: np.ndarray) -> None:
    """Row-major tiles of `rgb` ([rows·tile, cols·tile, 3|4] uint8) → `out` float32 [rows·cols, 3, t, t]:
    uint8 → float32, then ``/255``, ``−mean``, ``/std`` in place (float32 IEEE operations)."""
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


def _as_pil(rgb: np.ndarray) -> Image.Image:
    if rgb.shape[-1] == 4 and rgb.flags.c_contiguous:
        return Image.frombuffer("RGBX", (rgb.shape[1], rgb.shape[0]), rgb, "raw", "RGBX", 0, 1)
    return Image.fromarray(np.ascontiguousarray(rgb[..., :3]))


def reference_resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow ``resize((width, height), BICUBIC)`` of uint8 [H, W, 3|4] (a no-op at the same size)."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return np.asarray(_as_pil(rgb).resize((width, height), Image.Resampling.BICUBIC))


def reference_image_to_tiles(rgb: np.ndarray, max_num_tiles: int, mean: Sequence[float], std: Sequence[float],
                             tile: int = 512, use_thumbnail: bool = True) -> np.ndarray:
    """float32 [n, 3, tile, tile]: grid tiles in row-major order, then the thumbnail (the old serial path)."""
    height, width = rgb.shape[:2]
    cols, rows = tile_grid(width, height, max_num_tiles, tile)
    n_grid = cols * rows
    thumb = use_thumbnail and n_grid > 1
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    out = np.empty((n_grid + (1 if thumb else 0), 3, tile, tile), dtype=np.float32)
    _normalize_grid_into(reference_resize(rgb, tile * cols, tile * rows), cols, rows, tile, m, s, out[:n_grid])
    if thumb:
        _normalize_grid_into(reference_resize(rgb, tile, tile), 1, 1, tile, m, s, out[n_grid:])
    return out
