"""Image preprocessing: tile grids, exact pixels against a plain Pillow + numpy computation, modes, errors."""

from __future__ import annotations

import importlib.util
import io
import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from nemovl_trt.preprocess import image as image_mod
from nemovl_trt.preprocess.errors import PreprocessError
from nemovl_trt.preprocess.image import (
    decode_image,
    image_size,
    image_to_tiles,
    num_tiles,
    preprocess_image,
    preprocess_images,
    tile_grid,
)
from tests.image_reference import reference_image_to_tiles, reference_resize

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
T = 512


def _pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255.0 / w, y * 255.0 / h, ((x // 7 + y // 5) % 13) * 19.0], -1)
    return np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


# ------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize(("w", "h", "max_tiles", "grid", "tiles"), [
    (512, 512, 12, (1, 1), 1),  # exact tie with (2,2),(3,3): too small for the area rule
    (700, 700, 12, (1, 1), 1),  # 490000 <= 0.5*512^2*4
    (725, 725, 12, (2, 2), 5),  # 525625 > 524288: (2,2) wins the tie
    (1024, 1024, 12, (2, 2), 5),  # (3,3) needs > 1179648
    (1536, 1536, 12, (3, 3), 10),
    (1024, 512, 12, (2, 1), 3),  # tie with (4,2) lost: 524288 <= 1048576
    (2048, 1024, 12, (4, 2), 9),  # tie with (4,2) won
    (2048, 1536, 12, (4, 3), 13),
    (640, 480, 12, (4, 3), 13),  # small images are upscaled onto the closest grid
    (800, 600, 6, (3, 2), 7),  # 4:3 not available with 6 tiles: 1.5 is closest
    (6144, 512, 12, (12, 1), 13),
    (512, 6144, 12, (1, 12), 13),
    (10000, 100, 12, (12, 1), 13),  # extreme aspect ratios saturate at 1x12 / 12x1
    (100, 10000, 12, (1, 12), 13),
    (3000, 2000, 1, (1, 1), 1),  # max_num_tiles = 1: one tile, no thumbnail
    (700, 300, 12, (5, 2), 11),
    (300, 700, 12, (2, 5), 11),
    (1000, 400, 2, (2, 1), 3),
])
def test_tile_grid_table(w, h, max_tiles, grid, tiles):
    assert tile_grid(w, h, max_tiles) == grid
    assert num_tiles(w, h, max_tiles) == tiles


def test_no_thumbnail_when_disabled():
    assert num_tiles(1024, 512, 12, use_thumbnail=False) == 2


@pytest.mark.parametrize("bad", [0, 13, -1, 2.5, True, None])
def test_max_num_tiles_out_of_range(bad):
    with pytest.raises(PreprocessError) as e:
        tile_grid(100, 100, bad)
    assert e.value.code == "invalid_parameter" and e.value.param == "max_num_tiles"


# ------------------------------------------------------------------------------------------ pixels
def _independent_tiles(img: Image.Image, cols: int, rows: int) -> np.ndarray:
    """The reference written out plainly: Pillow resize + crops + thumbnail, then float32 normalize."""
    img = img.convert("RGB")
    big = img.resize((T * cols, T * rows), Image.BICUBIC)
    crops = [big.crop((c * T, r * T, (c + 1) * T, (r + 1) * T)) for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        crops.append(img.resize((T, T), Image.BICUBIC))
    x = np.stack([np.asarray(c, dtype=np.uint8) for c in crops]).astype(np.float32)  # [n,T,T,3]
    x = x / np.float32(255.0)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def test_full_pixel_tensor_png_matches_independent_computation():
    img = Image.fromarray(_pattern(700, 300))
    data = _encode(img, "PNG")
    got = preprocess_image(data, 12, MEAN, STD)
    assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == (11, 3, T, T)
    assert got.num_tiles == 11 and (got.width, got.height) == (700, 300)
    expected = _independent_tiles(Image.open(io.BytesIO(data)), 5, 2)
    assert np.array_equal(got.pixel_values, expected)  # bit-exact, not approximately equal


@pytest.mark.parametrize(("size", "subsampling", "progressive", "grid"), [
    ((2048, 1536), 2, False, (4, 3)),  # 4:2:0, grid equals the image size (resize skipped)
    ((960, 333), 0, True, (3, 1)),  # 4:4:4 progressive
    ((333, 517), 1, False, (2, 3)),  # 4:2:2
])
def test_full_pixel_tensor_jpeg_matches_independent_computation(size, subsampling, progressive, grid):
    img = Image.fromarray(_pattern(*size, seed=1))
    data = _encode(img, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    assert tile_grid(*size, 12) == grid
    got = preprocess_image(data, 12, MEAN, STD).pixel_values
    expected = _independent_tiles(Image.open(io.BytesIO(data)), *grid)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(("w", "h"), [(1100, 600), (1500, 1400), (600, 2000), (300, 200)])
def test_serial_and_parallel_paths_agree(w, h):
    rgb = _pattern(w, h, seed=3)
    a = image_to_tiles(rgb, 12, MEAN, STD, parallel=True)
    b = image_to_tiles(rgb, 12, MEAN, STD, parallel=False)
    assert np.array_equal(a, b) and a.shape[0] == num_tiles(w, h, 12)
    cols, rows = tile_grid(w, h, 12)
    assert np.array_equal(a, _independent_tiles(Image.fromarray(rgb), cols, rows))


def test_single_tile_image_is_resized_without_thumbnail():
    img = Image.fromarray(_pattern(300, 260, seed=4))
    got = preprocess_image(_encode(img, "PNG"), 12, MEAN, STD).pixel_values
    assert got.shape == (1, 3, T, T)
    assert np.array_equal(got, _independent_tiles(img, 1, 1))


def test_several_images_are_tiled_independently():
    a = _encode(Image.fromarray(_pattern(800, 800)), "PNG")
    b = _encode(Image.fromarray(_pattern(1024, 512)), "PNG")
    pv, counts = preprocess_images([a, b], 12, MEAN, STD)
    assert counts == [5, 3] and pv.shape == (8, 3, T, T)
    assert np.array_equal(pv[5:], preprocess_image(b, 12, MEAN, STD).pixel_values)


@pytest.mark.parametrize(("subsampling", "progressive"), [(0, False), (1, False), (2, False), (2, True), (0, True)])
def test_fast_jpeg_decoder_gives_pillows_pixels(subsampling, progressive):
    img = Image.fromarray(_pattern(257, 131, seed=5))
    data = _encode(img, "JPEG", quality=85, subsampling=subsampling, progressive=progressive)
    assert np.array_equal(decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


# ------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize(("mode", "fmt"), [
    ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("RGB", "WEBP"), ("RGBA", "WEBP"),
    ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "JPEG"), ("I;16", "PNG"),
])
def test_modes_convert_to_rgb_like_pillow(mode, fmt):
    base = Image.fromarray(_pattern(64, 48, seed=6))
    if mode == "RGBA":
        img = base.convert("RGBA")
        img.putalpha(Image.fromarray((np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)))
    elif mode == "P":
        img = base.quantize(colors=50)
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 3)
    else:
        img = base.convert(mode)
    kw = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    data = _encode(img, fmt, **kw)
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    if mode == "RGBA":  # alpha dropped, not composited
        assert np.array_equal(out, np.asarray(img.convert("RGB")))


# ------------------------------------------------------------------------------------------ errors
def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _jpeg_with_declared_size(w: int, h: int) -> bytes:
    data = bytearray(_encode(Image.fromarray(_pattern(40, 40)), "JPEG"))
    i = data.index(b"\xff\xc0")  # SOF0: FFC0, length(2), precision(1), height(2), width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _code(data: bytes, **kw) -> str:
    with pytest.raises(PreprocessError) as e:
        decode_image(data, **kw)
    return e.value.code


def test_too_small():
    assert _code(_encode(Image.fromarray(_pattern(31, 40)), "PNG")) == "image_too_small"
    assert _code(_encode(Image.fromarray(_pattern(40, 20)), "JPEG")) == "image_too_small"
    decode_image(_encode(Image.fromarray(_pattern(32, 32)), "PNG"))  # the limit itself is fine


def test_too_large_is_rejected_from_the_header():
    assert _code(_encode(Image.fromarray(_pattern(100, 100)), "PNG"), max_pixels=9999) == "image_too_large"
    # headers declaring 60000x60000 with no pixel data behind them: rejected before any decoding
    assert image_size(_png_header_only(60000, 60000)) == (60000, 60000)
    assert _code(_png_header_only(60000, 60000)) == "image_too_large"
    assert image_size(_jpeg_with_declared_size(60000, 50000)) == (60000, 50000)
    assert _code(_jpeg_with_declared_size(60000, 50000)) == "image_too_large"


@pytest.mark.parametrize(("mode", "kw"), [("RGB", {"lossless": True}), ("RGB", {"quality": 80}),
                                          ("RGBA", {"quality": 80})])
def test_webp_header_size(mode, kw):
    data = _encode(Image.fromarray(_pattern(321, 123)).convert(mode), "WEBP", **kw)
    assert image_size(data) == (321, 123)
    assert _code(data, max_pixels=321 * 123 - 1) == "image_too_large"


@pytest.mark.parametrize("data", [
    b"", b"hello world, not an image", b"GIF89a" + b"\x00" * 64, b"%PDF-1.4\n",
    b"\xff\xd8\xff\xe0" + b"\x00" * 20,  # JPEG magic, garbage after
])
def test_not_an_image(data):
    assert _code(data) == "invalid_image"


def test_truncated_images():
    jpg = _encode(Image.fromarray(_pattern(200, 200)), "JPEG")
    png = _encode(Image.fromarray(_pattern(200, 200)), "PNG")
    assert _code(jpg[: len(jpg) // 2]) == "invalid_image"
    assert _code(png[: len(png) // 2]) == "invalid_image"
    assert _code(_png_header_only(100, 100)) == "invalid_image"


def test_rgbx_input_gives_the_same_tiles():
    rgb = _pattern(900, 700, seed=7)
    rgbx = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    assert np.array_equal(image_to_tiles(rgbx, 12, MEAN, STD), image_to_tiles(rgb, 12, MEAN, STD))


# ------------------------------------------------- issue 17: exact kernels against the old path
needs_kernels = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients, edges and noise: resamples like a photo (not like flat noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0), 255.0 * x / w,
                  np.where((x // 40 + y // 30) % 2 == 0, 230.0, 20.0)], -1)
    return np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)


@needs_kernels
def test_kernels_pass_their_self_check_here():
    assert image_mod._fast_path_ok() is True


@needs_kernels
@pytest.mark.parametrize(("size", "fmt"), [
    ((2048, 1536), "JPEG"),  # grid = image size (no grid resize), 13 tiles
    ((1280, 720), "JPEG"),  # 16:9 upscaled onto a grid
    ((4000, 3000), "JPEG"),  # large, downscaled grid
    ((3000, 800), "PNG"),  # wide
    ((600, 2400), "JPEG"),  # tall
    ((333, 517), "PNG"),  # odd sizes, upscaled
    ((513, 511), "JPEG"),  # just around one tile
    ((50, 1700), "PNG"),  # extreme aspect: 1×12 grid
    ((257, 131), "JPEG"),  # small, 4:2:0
])
def test_new_path_matches_old_implementation_on_real_images(size, fmt):
    img = Image.fromarray(_photo(*size, seed=size[0] + size[1]))
    kw = {"quality": 90} if fmt == "JPEG" else {}
    data = _encode(img, fmt, **kw)
    got = preprocess_image(data, 12, MEAN, STD).pixel_values
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    want = reference_image_to_tiles(rgb, 12, MEAN, STD)
    assert got.dtype == np.float32 and got.shape == want.shape == (num_tiles(*size, 12), 3, T, T)
    assert np.array_equal(got, want)
    serial = preprocess_image(data, 12, MEAN, STD, parallel=False).pixel_values
    assert np.array_equal(serial, want)


@needs_kernels
def test_exact_resize_matches_pillow_on_random_sizes():
    rng = np.random.default_rng(17)
    cases = [((2048, 1536), (512, 512)), ((777, 1999), (512, 512)), ((500, 700), (400, 500)),
             ((500, 700), (400, 499)), ((100, 400), (300, 200)), ((300, 200), (2560, 1024)),
             ((9000, 200), (512, 512)), ((40, 40), (6144, 512)), ((2048, 1536), (2048, 1024)),
             ((2048, 1536), (1024, 1536))]  # the pass-order boundary, one-axis resizes, big factors
    cases += [((int(rng.integers(32, 1800)), int(rng.integers(32, 1800))),
               (int(rng.integers(16, 2000)), int(rng.integers(16, 2000)))) for _ in range(12)]
    for (w, h), (ow, oh) in cases:
        rgbx = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        want = reference_resize(rgbx, ow, oh)[..., :3]
        for parallel in (False, True):
            got = image_mod._resize_exact(rgbx, ow, oh, parallel=parallel)
            assert got.shape == (oh, ow, 4)
            assert np.array_equal(got[..., :3], want), ((w, h), (ow, oh), parallel)


def test_normalization_table_is_the_reference_arithmetic():
    lut = image_mod._norm_lut(MEAN, STD)
    v = np.arange(256, dtype=np.uint8)
    for c in range(3):
        x = v.astype(np.float32) / np.float32(255.0)
        want = (x - np.float32(MEAN[c])) / np.float32(STD[c])
        assert lut.dtype == np.float32 and np.array_equal(lut[c], want)
    assert lut[0, 0] < -1.7 and lut[2, 255] > 2.1  # CLIP stats: the range the encoder expects


def test_pillow_fallback_gives_the_same_tiles(monkeypatch):
    rgb = _photo(1100, 600, seed=9)
    fast = image_to_tiles(rgb, 12, MEAN, STD)
    monkeypatch.setattr(image_mod, "_FAST_OK", False)
    slow = image_to_tiles(rgb, 12, MEAN, STD)
    assert np.array_equal(fast, slow) and np.array_equal(slow, reference_image_to_tiles(rgb, 12, MEAN, STD))


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("NEMOVL_IMAGE_KERNELS", "pillow")
    assert image_mod._self_check() is False


def test_several_images_in_workers_match_one_by_one():
    datas = [_encode(Image.fromarray(_photo(w, h, seed=w)), "JPEG", quality=85)
             for w, h in [(1600, 1200), (640, 480), (300, 900), (2048, 1024)]]
    pv, counts = preprocess_images(datas, 12, MEAN, STD)
    assert counts == [num_tiles(w, h, 12) for w, h in [(1600, 1200), (640, 480), (300, 900), (2048, 1024)]]
    assert np.array_equal(pv, np.concatenate([preprocess_image(d, 12, MEAN, STD).pixel_values for d in datas]))
    with pytest.raises(PreprocessError) as e:  # the first bad image in order is the one reported
        preprocess_images([datas[0], b"not an image", datas[1]], 12, MEAN, STD)
    assert e.value.code == "invalid_image"


def test_warmup_reports_the_path_in_use(monkeypatch):
    monkeypatch.setattr(image_mod, "_FAST_OK", None)
    monkeypatch.setenv("NEMOVL_IMAGE_KERNELS", "pillow")
    assert image_mod.warmup() is False
    rgb = _photo(700, 300, seed=2)
    assert np.array_equal(image_to_tiles(rgb, 12, MEAN, STD), reference_image_to_tiles(rgb, 12, MEAN, STD))
    monkeypatch.delenv("NEMOVL_IMAGE_KERNELS")
    monkeypatch.setattr(image_mod, "_FAST_OK", None)
    assert image_mod.warmup() is (importlib.util.find_spec("numba") is not None)


@needs_kernels
@pytest.mark.parametrize(("src", "dst"), [((2048, 1536), (512, 512)),  # horizontal first, downscale
                                          ((777, 1999), (512, 512)),  # vertical first
                                          ((640, 480), (2048, 1536)),  # upscale
                                          ((9000, 300), (512, 512))])  # wide support, shared input rows
def test_any_band_split_of_a_resize_is_exact(src, dst):
    image_mod.warmup()
    rgbx = np.ascontiguousarray(np.concatenate(
        [_photo(*src, seed=11), np.zeros(src[::-1] + (1,), np.uint8)], axis=-1))
    want = reference_resize(rgbx, *dst)[..., :3]
    h = dst[1]
    for edges in ([0, h], [0, 1, 97, h], [0, h // 3, h // 3 + 1, h - 1, h]):
        bands = [image_mod._resize_band(rgbx, dst[0], h, a, b) for a, b in itertools.pairwise(edges)]
        assert np.array_equal(np.concatenate(bands)[..., :3], want), edges
