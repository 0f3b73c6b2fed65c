"""A deterministic synthetic visual-QA task family (Pillow images, PyAV videos).

Every sample is a pure function of ``(seed, split, question type, index)``: the same arguments give
the same pixels, question and answer on any machine. Train and eval use different *splits*, so a
held-out question can never be a training question, whatever seeds are chosen.

Question types (answers are one lower-case word or digit):

* ``color``  — one shape on a light background; "What color is the shape?" → a colour name.
* ``shape``  — the thick outline of one centred shape in a random colour; "What shape is shown?" →
  circle / square / triangle / diamond (the ``color`` question is asked about the same images).
* ``count``  — 1–5 equal dark dots; "How many circles are there?" → a digit.
* ``read``   — a word rendered with Pillow's default font; "What word is written?" → the word.
* ``detail`` — a 1024×512 image (2 tiles + thumbnail) with a framed box filled with 1-pixel vertical
  stripes, a 1-pixel checkerboard, or plain grey at the stripes' mean level. Resizing the image to
  512×512 (the thumbnail, or the whole image when ``max_num_tiles = 1``) averages every horizontal
  pixel pair, so all three textures become the same flat grey: only the full-resolution tiles show
  the answer.
* ``video_first`` / ``video_last`` — an 8-frame MP4 (2 fps): a square that jumps to a new place every
  frame and shows 2–3 colours one run after another; "Which color appears first / last?". Every frame
  changes, so EVS keeps some of the square's tokens in every frame, and reversing the frame order
  swaps the two answers.

Images are square and at most 512 pixels for the single-tile types, so they are one tile for any
``max_num_tiles`` (a square image ≤ 724 px keeps the 1×1 grid under the tie/area rule).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "read", "detail", "video_first", "video_last")
VIDEO_TYPES: frozenset[str] = frozenset({"video_first", "video_last"})
SPLITS: dict[str, int] = {"train": 0, "eval": 1}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
WORDS: tuple[str, ...] = ("cat", "sun", "tree", "moon", "zebra", "kiwi")
PATTERNS: tuple[str, ...] = ("stripes", "checks", "plain")
MAX_COUNT = 5
SHAPE_SIZE = 0.3  # shape "radius" / image side
SHAPE_STROKE = 0.07  # outline width / image side
COUNT_RADIUS = 0.13  # dot radius / image side
COUNT_INK_MAX = 59  # dots are grey 0..59 on the 200..250 background
COUNT_PLACEMENT_TRIES = 200

SINGLE_TILE_SIDES: tuple[int, ...] = (320, 384, 448, 512)  # pixels; square → always one tile
DETAIL_SIZE: tuple[int, int] = (1024, 512)  # (width, height) → a 2×1 grid + thumbnail
VIDEO_SIDE = 128  # pixels (frames are resized to one 512 tile by the preprocessing)
VIDEO_FRAMES = 8
VIDEO_FPS = 2
VIDEO_MIN_COLORS, VIDEO_MAX_COLORS = 2, 3  # colours shown one after another

# EVS rate the tiny checkpoint is trained with: the tiny preset's config `video_pruning_rate` (0.7, as the
# 12B's; a test checks they agree). Eval clients send it with every video so the served layout matches.
TRAINED_VIDEO_PRUNING_RATE = 0.7

SYSTEM_PROMPT = "/no_think"
QUESTIONS: dict[str, str] = {
    "color": "What color is the shape? Answer with one word.",
    "shape": "What shape is shown? Answer with one word.",
    "count": "How many circles are there? Answer with a number.",
    "read": "What word is written in the image? Answer with one word.",
    "detail": "What pattern fills the box? Answer with one word.",
    "video_first": "Which color appears first in the video? Answer with one word.",
    "video_last": "Which color appears last in the video? Answer with one word.",
}


@dataclass(frozen=True)
class Sample:
    """One question with its media and answer.

    Attributes:
        qtype: one of `QUESTION_TYPES`.
        index: position in its (seed, split, qtype) stream.
        question: the user text.
        answer: the expected answer (lower case, one word or digit).
        image: uint8 ``[H, W, 3]`` RGB for image questions, else None.
        video: MP4 bytes for video questions, else None.
        meta: generator facts the tests check pixels against (positions, sizes, colours, frames).
    """

    qtype: str
    index: int
    question: str
    answer: str
    image: np.ndarray | None = None
    video: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def image_png(self) -> bytes:
        """The image as PNG bytes (lossless: decoding gives `image` back exactly)."""
        if self.image is None:
            raise ValueError(f"sample {self.qtype}#{self.index} has no image")
        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG")
        return buf.getvalue()

    def messages(self, media_part: dict[str, Any]) -> list[dict[str, Any]]:
        """OpenAI-style chat messages: the system prompt, then [media part, question text]."""
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [media_part, {"type": "text", "text": self.question}]},
        ]


def normalize_answer(text: str) -> str:
    """Lower-case, trimmed, trailing punctuation removed: how model output is compared to `answer`."""
    return text.strip().lower().rstrip(".!?,;:").strip()


def _rng(seed: int, split: str, qtype: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {sorted(SPLITS)})")
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r} (choose from {list(QUESTION_TYPES)})")
    return np.random.default_rng([int(seed), SPLITS[split], QUESTION_TYPES.index(qtype), int(index)])


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey background (every channel equal, 200..250)."""
    v = int(rng.integers(200, 251))
    return (v, v, v)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of `kind` centred at (cx, cy) with circumradius-like size r; None for a circle."""
    if kind == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if kind == "circle":
        return None
    raise ValueError(f"unknown shape {kind!r}")


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
               color: tuple[int, int, int], stroke: int = 0) -> None:
    """Draw a shape of size r (pixels) centred at (cx, cy): filled, or its outline `stroke` pixels wide."""
    poly = _shape_polygon(kind, cx, cy, r)
    style: dict[str, Any] = {"outline": color, "width": stroke} if stroke else {"fill": color}
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
    else:
        draw.polygon(poly, **style)


def _single_shape(rng: np.random.Generator, kind: str, color: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The thick outline of one shape of size 0.3·side, centred: its strokes' directions (like a glyph's)
    tell the shapes apart."""
    side = int(rng.choice(SINGLE_TILE_SIDES))
    img = Image.new("RGB", (side, side), _background(rng))
    r = SHAPE_SIZE * side
    cx = cy = side / 2
    stroke = max(2, round(SHAPE_STROKE * side))
    draw_shape(ImageDraw.Draw(img), kind, cx, cy, r, COLORS[color], stroke=stroke)
    return np.asarray(img), {"side": side, "center": (cx, cy), "radius": r, "kind": kind, "color": color,
                             "stroke": stroke}


def _gen_color(rng: np.random.Generator) -> tuple[str, np.ndarray, dict[str, Any]]:
    color = str(rng.choice(list(COLORS)))
    kind = str(rng.choice(SHAPES))
    img, meta = _single_shape(rng, kind, color)
    return color, img, meta


def _gen_shape(rng: np.random.Generator) -> tuple[str, np.ndarray, dict[str, Any]]:
    kind = str(rng.choice(SHAPES))
    color = str(rng.choice(list(COLORS)))
    img, meta = _single_shape(rng, kind, color)
    return kind, img, meta


def _gen_count(rng: np.random.Generator) -> tuple[str, np.ndarray, dict[str, Any]]:
    """1–5 equal dark-grey dots (radius 0.13·side, at least 0.4 r apart edge to edge) on a light
    background. One ink colour per image keeps the question about *how many*, not *which colour*."""
    n = int(rng.integers(1, MAX_COUNT + 1))
    side = int(rng.choice(SINGLE_TILE_SIDES))
    bg = _background(rng)
    v = int(rng.integers(0, COUNT_INK_MAX + 1))
    ink = (v, v, v)
    r = side * COUNT_RADIUS
    centers: list[tuple[float, float]] = []
    while len(centers) < n:  # rejection sampling, restarted when a layout leaves no room for the rest
        centers = []
        for _ in range(COUNT_PLACEMENT_TRIES):
            c = (float(rng.uniform(r + 2, side - r - 2)), float(rng.uniform(r + 2, side - r - 2)))
            if all((c[0] - p[0]) ** 2 + (c[1] - p[1]) ** 2 > (2.4 * r) ** 2 for p in centers):
                centers.append(c)
                if len(centers) == n:
                    break
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for cx, cy in centers:
        draw_shape(draw, "circle", cx, cy, r, ink)
    return str(n), np.asarray(img), {"side": side, "centers": centers, "radius": r, "ink": ink}


def _gen_read(rng: np.random.Generator) -> tuple[str, np.ndarray, dict[str, Any]]:
    word = str(rng.choice(WORDS))
    side = int(rng.choice(SINGLE_TILE_SIDES))
    img = Image.new("RGB", (side, side), _background(rng))
    draw = ImageDraw.Draw(img)
    size = int(side * 0.2)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = (side - (right - left)) / 2 - left  # centred
    y = (side - (bottom - top)) / 2 - top
    ink = int(rng.integers(0, 60))
    draw.text((x, y), word, fill=(ink, ink, ink), font=font)
    return word, np.asarray(img), {"side": side, "font_size": size, "origin": (x, y),
                                   "bbox": (x + left, y + top, x + right, y + bottom)}


def texture(pattern: str, height: int, width: int, low: int, high: int, phase: int) -> np.ndarray:
    """A uint8 ``[height, width]`` texture whose horizontal pixel pairs all average to (low+high)/2.

    stripes: 1-pixel vertical stripes; checks: 1-pixel checkerboard; plain: flat (low+high)//2.
    `phase` (0/1) shifts which level comes first.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    if pattern == "stripes":
        on = (xs + phase) % 2 == 0
    elif pattern == "checks":
        on = (xs + ys + phase) % 2 == 0
    elif pattern == "plain":
        return np.full((height, width), (low + high) // 2, dtype=np.uint8)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.where(on, high, low).astype(np.uint8)


def _gen_detail(rng: np.random.Generator) -> tuple[str, np.ndarray, dict[str, Any]]:
    pattern = str(rng.choice(PATTERNS))
    width, height = DETAIL_SIZE
    img = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # distractor shapes, visible at every resolution
        r = float(rng.uniform(30, 70))
        draw_shape(draw, str(rng.choice(SHAPES)), float(rng.uniform(r, width - r)),
                   float(rng.uniform(r, height - r)), r, COLORS[str(rng.choice(list(COLORS)))])
    box = int(rng.integers(12, 19)) * 10  # even side, 120..180 px
    x0 = int(rng.integers(4, (width - box - 4) // 2)) * 2  # even x: pairs align with the 2× downscale
    y0 = int(rng.integers(4, height - box - 4))
    border = 4
    draw.rectangle([x0, y0, x0 + box - 1, y0 + box - 1], fill=(20, 20, 20))
    arr = np.array(img)
    low = int(rng.integers(0, 60))
    high = int(rng.integers(196, 256))
    inner = box - 2 * border
    tex = texture(pattern, inner, inner, low, high, int(rng.integers(0, 2)))
    arr[y0 + border:y0 + border + inner, x0 + border:x0 + border + inner] = tex[..., None]
    return pattern, arr, {"box": (x0, y0, box), "border": border, "levels": (low, high)}


def video_frames(colors_per_frame: list[str], side: int, bg: tuple[int, int, int],
                 boxes: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """RGB frames ``[side, side, 3]``: frame t shows a filled square `boxes[t]` = (x, y, size) in
    `colors_per_frame[t]`."""
    frames = []
    for name, (x, y, s) in zip(colors_per_frame, boxes, strict=True):
        img = Image.new("RGB", (side, side), bg)
        ImageDraw.Draw(img).rectangle([x, y, x + s - 1, y + s - 1], fill=COLORS[name])
        frames.append(np.asarray(img))
    return frames


def encode_mp4(frames: list[np.ndarray], fps: int) -> bytes:
    """H.264 MP4 (yuv420p, one encoder thread, so the bytes are deterministic) of RGB uint8 frames."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        h, w = frames[0].shape[:2]
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "16", "preset": "medium", "threads": "1"}
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _gen_video(rng: np.random.Generator, which: str) -> tuple[str, bytes, dict[str, Any]]:
    """A square of one size that jumps to a new place every frame, shown in 2–3 colours one run after
    another (every frame shows it: first = frame 1's colour, last = the final frame's)."""
    n_colors = int(rng.integers(VIDEO_MIN_COLORS, VIDEO_MAX_COLORS + 1))
    names = [str(c) for c in rng.choice(list(COLORS), size=n_colors, replace=False)]
    # split the frames into n_colors runs of ≥ 1 frame each
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, VIDEO_FRAMES), size=n_colors - 1, replace=False))
    runs = np.diff([0, *cuts, VIDEO_FRAMES]).tolist()
    per_frame = [name for name, k in zip(names, runs, strict=True) for _ in range(int(k))]
    side = VIDEO_SIDE
    bg = _background(rng)
    size = int(rng.integers(side // 2, side * 3 // 4)) // 2 * 2
    # a new place every frame: every frame changes, so EVS keeps tokens of the square in every frame
    boxes = [(int(rng.integers(0, side - size)), int(rng.integers(0, side - size)), size)
             for _ in range(VIDEO_FRAMES)]
    data = encode_mp4(video_frames(per_frame, side, bg, boxes), VIDEO_FPS)
    answer = names[0] if which == "video_first" else names[-1]
    return answer, data, {"frames": per_frame, "boxes": boxes, "side": side, "fps": VIDEO_FPS}


def generate_sample(qtype: str, index: int, seed: int = 0, split: str = "train") -> Sample:
    """The `index`-th sample of type `qtype` in the (seed, split) stream (deterministic)."""
    rng = _rng(seed, split, qtype, index)
    question = QUESTIONS[qtype]
    if qtype in VIDEO_TYPES:
        answer, video, meta = _gen_video(rng, qtype)
        return Sample(qtype, index, question, answer, video=video, meta=meta)
    gen = {"color": _gen_color, "shape": _gen_shape, "count": _gen_count, "read": _gen_read,
           "detail": _gen_detail}[qtype]
    answer, image, meta = gen(rng)
    return Sample(qtype, index, question, answer, image=image, meta=meta)


def generate_samples(n: int, seed: int = 0, split: str = "eval",
                     types: tuple[str, ...] = QUESTION_TYPES) -> list[Sample]:
    """`n` samples spread round-robin over `types` (type i gets indices 0, 1, … in its own stream)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return [generate_sample(types[i % len(types)], i // len(types), seed, split) for i in range(n)]


def answer_vocabulary(qtype: str) -> tuple[str, ...]:
    """Every possible answer of a question type."""
    return {
        "color": tuple(COLORS), "shape": SHAPES, "count": tuple(str(i) for i in range(1, MAX_COUNT + 1)),
        "read": WORDS, "detail": PATTERNS, "video_first": tuple(COLORS), "video_last": tuple(COLORS),
    }[qtype]
