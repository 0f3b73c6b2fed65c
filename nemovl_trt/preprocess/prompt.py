"""Chat prompt → token ids with image / video placeholders expanded (docs/model.md §3.3, §5; docs/api.md).

Steps of `build_prompt`:

1. Reasoning (docs/api.md: off unless asked). The last ``/think`` or ``/no_think`` over the system and
   user texts wins. With neither, ``/no_think`` is added to the system message; with a video,
   ``/no_think`` is added after every other flag (video forces reasoning off) and a warning is
   returned if ``/think`` had been requested. The template strips the flags from the text, so only
   the generation prompt changes.
2. The messages are rendered with the checkpoint's own chat template, which writes the literal
   placeholders (``cfg.img_context_token`` "<image>", ``cfg.video_context_token`` "<video>") where
   media parts are.
3. The text is split at the placeholders; each text piece is tokenized on its own (no BOS), and
   * each image becomes ``<img>`` + ``<image>``×(P·tiles) + ``</img>`` (P = ``cfg.tokens_per_tile``);
   * the video becomes the training / TRT-LLM frame layout: ``"This is a video:\\n"`` prefixed to the
     first frame's separator, then per frame i (1-based)
     ``"Frame {i} sampled at {t_i:.2f} seconds: "`` + ``<img>`` + ``<image>``×n_i + ``</img>`` +
     ``"\\n"``. Every separator and the newline are tokenized independently, so their ids do not
     depend on n_i. Without EVS n_i = P; with EVS rate q all R = `retained_count` tokens are put in
     frame 1 (as vLLM / TRT-LLM do) and `rebuild_video_prompt` moves them to their frames after EVS.
4. ``prompt + max_tokens > max_seq_len`` → ``context_length_exceeded``; without ``max_tokens`` the
   remaining context is returned as ``max_tokens``.

Message text may not contain the placeholder strings themselves (``invalid_parameter``): otherwise
a user could forge media slots.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nemovl_trt.checkpoint.config import VLMConfig
from nemovl_trt.checkpoint.tokenizer import TokenizerBundle
from nemovl_trt.preprocess.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_PARAMETER,
    TOO_MANY_IMAGES,
    PreprocessError,
)
from nemovl_trt.preprocess.evs import retained_count

THINK_ON = "/think"
THINK_OFF = "/no_think"
VIDEO_PREFIX = "This is a video:\n"
FRAME_END = "\n"
REASONING_WITH_VIDEO_WARNING = "Reasoning (/think) is not supported for video requests; it was turned off."


def frame_separator(i: int, timestamp: float | None) -> str:
    """Text before frame `i`'s (1-based) ``<img>``: ``"Frame i sampled at t.tt seconds: "``
    (``"Frame i: "`` without a timestamp); frame 1 carries the ``"This is a video:\\n"`` prefix."""
    sep = f"Frame {i}: " if timestamp is None else f"Frame {i} sampled at {timestamp:.2f} seconds: "
    return (VIDEO_PREFIX + sep) if i == 1 else sep


@dataclass(frozen=True)
class ImageInput:
    """What the prompt needs to know about one image: its tile count."""

    num_tiles: int


@dataclass(frozen=True)
class VideoInput:
    """What the prompt needs to know about the video.

    num_frames: sampled frames T (may be left out when `timestamps` is given).
    timestamps: T seconds (``VideoFrames.timestamps``); None (or None entries) gives ``"Frame i: "``.
    pruning_rate: the EVS rate q (0 = off).
    """

    num_frames: int | None = None
    timestamps: Sequence[float | None] | None = None
    pruning_rate: float = 0.0

    def __post_init__(self) -> None:
        n = self.num_frames if self.num_frames is not None else (
            len(self.timestamps) if self.timestamps is not None else 0)
        if n < 1:
            raise ValueError("a video needs at least one frame (give num_frames or timestamps)")
        if self.timestamps is not None and len(self.timestamps) != n:
            raise ValueError(f"{len(self.timestamps)} timestamps for {n} frames")
        object.__setattr__(self, "num_frames", int(n))

    def frame_times(self) -> list[float | None]:
        return list(self.timestamps) if self.timestamps is not None else [None] * int(self.num_frames or 0)


@dataclass(frozen=True)
class VideoLayout:
    """Where the video block is and how to rebuild it (used by `rebuild_video_prompt`).

    start, end: the block's span in ``input_ids`` (end exclusive).
    separators: per frame, the token ids before ``<img>``; newline: the ids after ``</img>``.
    frame_spans: per frame, the (start, end) span of its context tokens in ``input_ids``.
    """

    start: int
    end: int
    separators: list[list[int]]
    newline: list[int]
    img_start_id: int
    img_end_id: int
    context_id: int
    tokens_per_frame: int
    retained: int
    frame_spans: list[tuple[int, int]]


@dataclass
class PromptResult:
    """The tokenized prompt.

    input_ids: prompt token ids (no BOS), images / video expanded.
    num_prompt_tokens: ``len(input_ids)``.
    max_tokens: the completion budget (the request's, or what is left of the context).
    reasoning: whether the generation prompt opens a thinking block.
    warnings: user-visible notes (e.g. /think ignored for video).
    image_spans: per image in prompt order, the (start, end) span of its context tokens.
    image_order: per image in prompt order, its index into the request's images.
    video: the video block layout, or None.
    text: the rendered template text (placeholders not expanded), for logs and tests.
    """

    input_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    reasoning: bool
    warnings: list[str] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    image_order: list[int] = field(default_factory=list)
    video: VideoLayout | None = None
    text: str = ""

    @property
    def image_token_spans(self) -> list[tuple[int, int]]:
        """Alias of `image_spans`."""
        return self.image_spans

    @property
    def num_image_tokens(self) -> int:
        return sum(e - s for s, e in self.image_spans)

    @property
    def num_video_tokens(self) -> int:
        return 0 if self.video is None else sum(e - s for s, e in self.video.frame_spans)


# --------------------------------------------------------------------------------------- messages
def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise PreprocessError(INVALID_PARAMETER, "Message content must be a string or a list of parts.",
                          param="messages")


def _text_of(content: Any) -> str:
    return "\n".join(str(p.get("text", "")) for p in _parts(content) if p.get("type") == "text")


def _requested_reasoning(messages: list[dict[str, Any]]) -> bool | None:
    """The last /think or /no_think in system/user texts (the template's rule); None if neither."""
    state: bool | None = None
    for m in messages:
        if m.get("role") not in ("system", "user"):
            continue
        text = _text_of(m.get("content"))
        on, off = text.rfind(THINK_ON), text.rfind(THINK_OFF)
        if on > off:
            state = True
        elif off > on:
            state = False
    return state


def _append_flag(message: dict[str, Any], flag: str) -> dict[str, Any]:
    m = dict(message)
    content = m.get("content")
    if content is None:
        m["content"] = flag
    elif isinstance(content, str):
        m["content"] = f"{content} {flag}"
    else:
        m["content"] = list(content) + [{"type": "text", "text": flag}]
    return m


def _media_parts(messages: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(kind, index) of every image/video part, in message order (the order the template renders
    them). A part without ``index`` refers to the next unused index of its kind."""
    out: list[tuple[str, int]] = []
    seen = {"image": 0, "video": 0}
    for m in messages:
        for p in _parts(m.get("content")):
            kind = p.get("type")
            if kind not in ("image", "image_url", "video", "video_url"):
                continue
            k = "image" if kind.startswith("image") else "video"
            idx = p.get("index", seen[k])
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise PreprocessError(INVALID_PARAMETER, "A media part has an invalid index.", param="messages")
            seen[k] += 1
            out.append((k, idx))
    return out


def _check_no_placeholders(messages: list[dict[str, Any]], reserved: Sequence[str]) -> None:
    for m in messages:
        text = _text_of(m.get("content"))
        for r in reserved:
            if r in text:
                raise PreprocessError(INVALID_PARAMETER, f"Message text may not contain the reserved string "
                                      f"'{r}'.", param="messages")


# ---------------------------------------------------------------------------------------- prompt
def _special_id(tok: TokenizerBundle, token: str) -> int:
    tid = tok.special.get(token)
    return tid if tid is not None else tok.token_id(token)


def _video_block(tok: TokenizerBundle, video: VideoInput, counts: Sequence[int], img_start: int, img_end: int,
                 ctx: int) -> tuple[list[int], list[list[int]], list[int], list[tuple[int, int]]]:
    """Ids of the whole video block, the separators, the newline ids and the frame spans (relative)."""
    seps = [tok.encode(frame_separator(i + 1, t)) for i, t in enumerate(video.frame_times())]
    newline = tok.encode(FRAME_END)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for sep, n in zip(seps, counts, strict=True):
        ids += sep
        ids.append(img_start)
        spans.append((len(ids), len(ids) + n))
        ids += [ctx] * n
        ids.append(img_end)
        ids += newline
    return ids, seps, newline, spans


def build_prompt(messages: list[dict[str, Any]], tokenizer: TokenizerBundle, cfg: VLMConfig,
                 images: Sequence[ImageInput] = (), video: VideoInput | None = None,
                 tools: list[dict[str, Any]] | None = None, max_tokens: int | None = None,
                 max_seq_len: int | None = None, max_images: int | None = None) -> PromptResult:
    """Render, tokenize and expand a chat request (module docstring).

    Args:
        messages: OpenAI-style messages; media parts are ``{"type": "image", "index": i}`` (i into
            `images`) and ``{"type": "video", "index": 0}``.
        tokenizer: the checkpoint's `TokenizerBundle`.
        cfg: the checkpoint config (placeholder strings, context id, tokens per tile, context length).
        images: tile counts of the request's images, by index.
        video: the request's video (at most one), or None.
        tools: OpenAI tool definitions for the template.
        max_tokens: requested completion length, or None for "the rest of the context".
        max_seq_len: context window (default ``cfg.max_sequence_length``).
        max_images: at most this many image parts (``too_many_images``), None = no limit.

    Raises:
        PreprocessError: ``invalid_parameter``, ``too_many_images``, ``context_length_exceeded``.
    """
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise PreprocessError(INVALID_PARAMETER, "messages must be a non-empty list of message objects.",
                              param="messages")
    img_ph, vid_ph = cfg.img_context_token, cfg.video_context_token
    _check_no_placeholders(messages, [img_ph, vid_ph, cfg.img_start_token, cfg.img_end_token])
    media = _media_parts(messages)
    image_refs = [i for kind, i in media if kind == "image"]
    video_refs = [i for kind, i in media if kind == "video"]
    if max_images is not None and len(image_refs) > max_images:
        raise PreprocessError(TOO_MANY_IMAGES, f"The request has {len(image_refs)} images; at most {max_images} "
                              f"are allowed.", param="messages")
    if video_refs and image_refs:
        raise PreprocessError(INVALID_PARAMETER, "A request may contain images or one video, not both.",
                              param="messages")
    if len(video_refs) > 1:
        raise PreprocessError(INVALID_PARAMETER, "A request may contain at most one video.", param="messages")
    if any(i >= len(images) for i in image_refs):
        raise PreprocessError(INVALID_PARAMETER, "A message refers to an image that was not provided.",
                              param="messages")
    if video_refs and (video is None or video_refs[0] != 0):
        raise PreprocessError(INVALID_PARAMETER, "A message refers to a video that was not provided.",
                              param="messages")
    if video is not None and not video_refs:
        video = None  # a video nobody refers to is not part of the prompt

    # 1. reasoning
    msgs = [dict(m) for m in messages]
    requested = _requested_reasoning(msgs)
    warnings: list[str] = []
    if video is not None:
        if requested is not False:
            last = max(i for i, m in enumerate(msgs) if m.get("role") in ("system", "user"))
            msgs[last] = _append_flag(msgs[last], THINK_OFF)
        if requested is True:
            warnings.append(REASONING_WITH_VIDEO_WARNING)
        reasoning = False
    elif requested is None:
        if msgs[0].get("role") == "system":
            msgs[0] = _append_flag(msgs[0], THINK_OFF)
        else:
            msgs.insert(0, {"role": "system", "content": THINK_OFF})
        reasoning = False
    else:
        reasoning = requested

    # 2. render
    try:
        text = tokenizer.render(copy.deepcopy(msgs), tools=tools, add_generation_prompt=True)
    except ValueError as e:
        raise PreprocessError(INVALID_PARAMETER, f"The messages cannot be rendered: {e}.",
                              param="messages") from None

    # 3. split at the placeholders and expand
    img_start, img_end = _special_id(tokenizer, cfg.img_start_token), _special_id(tokenizer, cfg.img_end_token)
    ctx = cfg.img_context_token_id
    per_tile = cfg.tokens_per_tile
    ids: list[int] = []
    image_spans: list[tuple[int, int]] = []
    layout: VideoLayout | None = None
    img_iter = iter(image_refs)
    pos = 0
    while True:
        nxt_i = text.find(img_ph, pos)
        nxt_v = text.find(vid_ph, pos)
        cands = [(p, ph) for p, ph in ((nxt_i, img_ph), (nxt_v, vid_ph)) if p >= 0]
        if not cands:
            ids += tokenizer.encode(text[pos:])
            break
        at, ph = min(cands)
        if at > pos:
            ids += tokenizer.encode(text[pos:at])
        if ph == img_ph:
            ref = next(img_iter, None)
            if ref is None:
                raise PreprocessError(INVALID_PARAMETER, "The chat template produced more image placeholders "
                                      "than the messages have images.", param="messages")
            n = per_tile * images[ref].num_tiles
            ids.append(img_start)
            image_spans.append((len(ids), len(ids) + n))
            ids += [ctx] * n
            ids.append(img_end)
        else:
            if video is None or layout is not None:
                raise PreprocessError(INVALID_PARAMETER, "The chat template produced an unexpected video "
                                      "placeholder.", param="messages")
            t = int(video.num_frames or 0)
            r = retained_count(t, per_tile, video.pruning_rate)
            counts = [per_tile] * t if r == t * per_tile else [r] + [0] * (t - 1)
            block, seps, newline, spans = _video_block(tokenizer, video, counts, img_start, img_end, ctx)
            start = len(ids)
            ids += block
            layout = VideoLayout(start=start, end=len(ids), separators=seps, newline=newline,
                                 img_start_id=img_start, img_end_id=img_end, context_id=ctx,
                                 tokens_per_frame=per_tile, retained=r,
                                 frame_spans=[(start + s, start + e) for s, e in spans])
        pos = at + len(ph)
    if next(img_iter, None) is not None or (video is not None and layout is None):
        raise PreprocessError(INVALID_PARAMETER, "The chat template did not place every media part.",
                              param="messages")

    # 4. context budget
    limit = int(max_seq_len if max_seq_len is not None else cfg.max_sequence_length)
    n_prompt = len(ids)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise PreprocessError(INVALID_PARAMETER, f"max_tokens must be a positive integer, got {max_tokens!r}.",
                              param="max_tokens")
    budget = limit - n_prompt
    if max_tokens is None:
        if budget < 1:
            raise PreprocessError(CONTEXT_LENGTH_EXCEEDED, f"The prompt has {n_prompt} tokens, which leaves no "
                                  f"room in the {limit}-token context window.", param="messages")
        max_tokens = budget
    elif max_tokens > budget:
        raise PreprocessError(CONTEXT_LENGTH_EXCEEDED, f"The prompt has {n_prompt} tokens and max_tokens is "
                              f"{max_tokens}, more than the {limit}-token context window.", param="max_tokens")
    return PromptResult(input_ids=ids, num_prompt_tokens=n_prompt, max_tokens=max_tokens, reasoning=reasoning,
                        warnings=warnings, image_spans=image_spans, image_order=image_refs, video=layout,
                        text=text)


def rebuild_video_prompt(input_ids: Sequence[int], per_frame_counts: Sequence[int] | VideoLayout,
                         layout: VideoLayout | Sequence[int]) -> tuple[list[int], VideoLayout]:
    """After EVS: rewrite the video block so frame t holds its own ``n_t`` kept tokens.

    Args:
        input_ids: the prompt from `build_prompt` (R context tokens in frame 1).
        per_frame_counts: ``n_t`` per frame (from `evs.per_frame_counts`), summing to ``layout.retained``.
        layout: the prompt's `VideoLayout` (``PromptResult.video``). The two last arguments may
            also be given in the order (layout, per_frame_counts).

    Returns:
        (new input ids of the same length, the new layout with updated frame spans).
    """
    if isinstance(per_frame_counts, VideoLayout):
        per_frame_counts, layout = layout, per_frame_counts
    assert isinstance(layout, VideoLayout)
    counts = [int(c) for c in per_frame_counts]
    if len(counts) != len(layout.separators) or sum(counts) != layout.retained:
        raise ValueError(f"per-frame counts {counts} do not match the video layout "
                         f"({len(layout.separators)} frames, {layout.retained} tokens)")
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for sep, n in zip(layout.separators, counts, strict=True):
        ids += sep
        ids.append(layout.img_start_id)
        spans.append((layout.start + len(ids), layout.start + len(ids) + n))
        ids += [layout.context_id] * n
        ids.append(layout.img_end_id)
        ids += layout.newline
    if len(ids) != layout.end - layout.start:
        raise ValueError("the rebuilt video block changed length")
    out = list(input_ids[:layout.start]) + ids + list(input_ids[layout.end:])
    new_layout = VideoLayout(start=layout.start, end=layout.end, separators=layout.separators,
                             newline=layout.newline, img_start_id=layout.img_start_id,
                             img_end_id=layout.img_end_id, context_id=layout.context_id,
                             tokens_per_frame=layout.tokens_per_frame, retained=layout.retained,
                             frame_spans=spans)
    return out, new_layout
