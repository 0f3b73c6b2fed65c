"""The request logic of the `preprocessor` and `nemovl` models, without Triton types (testable directly, and
used by the tests to compute the reference inputs the server should see).

- `parse_request_params` validates the `params` JSON of docs/interfaces.md (bad values →
  PreprocessError("invalid_parameter")).
- `preprocess_request` = media decode + tiling / frame sampling + chat template + token expansion + the
  context-length check; returns the prompt ids, the pixel tiles and an `info` dict (public info, resolved
  sampling, stop strings, video layout for EVS).
- `apply_video_evs` prunes video tokens on the projected embeddings and rebuilds the frame layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemovl_trt.checkpoint.config import VLMConfig, load_vlm_config
from nemovl_trt.checkpoint.tokenizer import TokenizerBundle, load_tokenizer
from nemovl_trt.preprocess.errors import (
    INVALID_PARAMETER,
    INVALID_VIDEO_SAMPLING,
    TOO_MANY_IMAGES,
    PreprocessError,
)
from nemovl_trt.preprocess.video import CPU_DECODER
from nemovl_trt.triton.models import manifest as mf

MAX_STOP_STRINGS = 4  # OpenAI: `stop` is a string or a list of at most 4 strings
DEFAULT_TEMPERATURE = 0.0


@dataclass
class EntryContext:
    """What the entry and preprocessor models load once: config, tokenizer and limits."""

    cfg: VLMConfig
    tokenizer: TokenizerBundle
    eos_ids: tuple[int, ...]
    max_seq_len: int
    max_num_tiles: int
    max_images: int
    max_video_frames: int
    video_pruning_rate: float
    video_decoder: str = CPU_DECODER  # one of preprocess/video.py VIDEO_DECODERS (model parameter)
    _decode_cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, engines_dir: Path, manifest: dict[str, Any], params: dict[str, str] | None = None,
             ) -> EntryContext:
        """From the engines dir; `params` (the model-config parameters) override the manifest limits."""
        params = params or {}
        lim = mf.limits(manifest)
        llm = mf.llm_dir(engines_dir, manifest)
        cfg = load_vlm_config(mf.config_dir(engines_dir, manifest))
        tok = load_tokenizer(mf.tokenizer_dir(engines_dir, manifest))
        eos = _generation_eos(llm) or tuple(tok.eos_ids)

        def pick(name: str) -> str:
            return str(params.get(name) or lim[name])

        return cls(cfg=cfg, tokenizer=tok, eos_ids=tuple(eos),
                   max_seq_len=min(int(pick("max_seq_len")), cfg.max_sequence_length),
                   max_num_tiles=int(pick("max_num_tiles")), max_images=int(pick("max_images")),
                   max_video_frames=int(pick("max_video_frames")),
                   video_pruning_rate=float(params.get("video_pruning_rate") or 0.0),
                   video_decoder=str(params.get("video_decoder") or CPU_DECODER))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """One token as OpenAI's logprobs show it: (its text, its UTF-8 bytes). A byte-level BPE piece that
        is part of a multi-byte character has its raw bytes and U+FFFD as text."""
        hit = self._decode_cache.get(token_id)
        if hit is None:
            tk = self.tokenizer.tokenizer
            if "added" not in self._decode_cache:
                from tokenizers import decoders

                self._decode_cache["added"] = set(tk.get_added_tokens_decoder())
                self._decode_cache["byte_level"] = isinstance(tk.decoder, decoders.ByteLevel)
            piece = tk.id_to_token(int(token_id)) or ""
            text = self.tokenizer.decode([int(token_id)])
            table = _byte_decoder()
            if (int(token_id) not in self._decode_cache["added"] and self._decode_cache["byte_level"]
                    and all(ch in table for ch in piece)):
                raw = [table[ch] for ch in piece]
            else:
                raw = list(text.encode("utf-8"))
            hit = self._decode_cache[token_id] = (text, raw)
        return hit


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the character a byte-level BPE writes for each byte → the byte."""
    cached = getattr(_byte_decoder, "table", None)
    if cached is None:
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
            + list(range(ord("\u00ae"), ord("\u00ff") + 1))
        chars = {b: chr(b) for b in keep}
        shifted = 0
        for b in range(256):
            if b not in chars:
                chars[b] = chr(256 + shifted)
                shifted += 1
        cached = {c: b for b, c in chars.items()}
        _byte_decoder.table = cached  # type: ignore[attr-defined]
    return cached


def _generation_eos(llm_dir: Path) -> tuple[int, ...]:
    path = llm_dir / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


# ---------------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class RequestParams:
    """Validated request parameters (docs/interfaces.md `params`)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    max_num_tiles: int
    fps: float | None
    num_frames: int | None
    video_pruning_rate: float
    ignore_eos: bool
    extra: dict[str, Any] = field(default_factory=dict)  # the sampling extensions below, only when set


# Sampling extensions passed to the llm as they are (validated here for gRPC clients; docs/api.md).
MAX_N = 8
MAX_LOGPROBS = 20


def _extensions(raw: dict[str, Any], ctx: EntryContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = _num(raw, "n", int, 1, MAX_N)
    if n is not None and n != 1:
        out["n"] = n
    for key in ("frequency_penalty", "presence_penalty"):
        v = _num(raw, key, float, -2.0, 2.0)
        if v:
            out[key] = v
    rp = _num(raw, "repetition_penalty", float, 0.0, lo_open=True)
    if rp is not None and rp != 1.0:
        out["repetition_penalty"] = rp
    for key in ("logprobs", "prompt_logprobs"):
        v = _num(raw, key, int, 0, MAX_LOGPROBS)
        if v is not None:
            out[key] = v
    bias = raw.get("logit_bias")
    if bias:
        if not isinstance(bias, dict):
            raise _bad("logit_bias", "'logit_bias' must be an object of token id → bias.")
        vocab = ctx.cfg.llm.vocab_size
        clean = {}
        for k, v in bias.items():
            if not str(k).isdigit() or int(k) >= vocab:
                raise _bad("logit_bias", f"'logit_bias' key {k!r} is not a token id in [0, {vocab}).")
            if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
                raise _bad("logit_bias", f"'logit_bias' values must be numbers in [-100, 100]; got {v!r}.")
            clean[str(int(k))] = float(v)
        out["logit_bias"] = clean
    guided = raw.get("guided")
    if guided is not None:
        if not isinstance(guided, dict) or "type" not in guided:
            raise _bad("guided", "'guided' must be a structured-output spec object with a 'type'.")
        out["guided"] = guided
    return out


def _bad(param: str, msg: str) -> PreprocessError:
    return PreprocessError(INVALID_PARAMETER, msg, param=param)


def _num(raw: dict[str, Any], key: str, kind: type, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False) -> Any:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
        raise _bad(key, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}.")
    v = kind(v)
    if not math.isfinite(float(v)):
        raise _bad(key, f"'{key}' must be finite.")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _bad(key, f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}.")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise _bad(key, f"'{key}' must be {'<' if hi_open else '<='} {hi}, got {v}.")
    return v


def parse_request_params(raw: Any, ctx: EntryContext) -> RequestParams:
    """Validate the `params` JSON object; raises PreprocessError(invalid_parameter) naming the field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _bad("params", "'params' must be a JSON object.")
    stop = raw.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings.")
    fps = _num(raw, "fps", float, 0.0, lo_open=True)
    num_frames = _num(raw, "num_frames", int, 1)
    if fps is not None and num_frames is not None:
        raise _bad("media_io_kwargs", "Give either fps or num_frames for a video, not both.")
    max_tiles = _num(raw, "max_num_tiles", int, 1, ctx.max_num_tiles)
    q = _num(raw, "video_pruning_rate", float, 0.0, 1.0, hi_open=True)
    top_p = _num(raw, "top_p", float, 0.0, 1.0, lo_open=True)
    return RequestParams(
        max_tokens=_num(raw, "max_tokens", int, 1), temperature=_num(raw, "temperature", float, 0.0, 2.0)
        if raw.get("temperature") is not None else DEFAULT_TEMPERATURE,
        top_p=1.0 if top_p is None else top_p, top_k=_num(raw, "top_k", int, 0) or 0,
        seed=_num(raw, "seed", int), stop=[s for s in stop if s],
        max_num_tiles=ctx.max_num_tiles if max_tiles is None else max_tiles, fps=fps, num_frames=num_frames,
        video_pruning_rate=ctx.video_pruning_rate if q is None else q, ignore_eos=bool(raw.get("ignore_eos", False)),
        extra=_extensions(raw, ctx))


def parse_messages(raw: bytes | None) -> list[dict[str, Any]]:
    """The `messages` JSON list; PreprocessError(invalid_parameter) when it is not a non-empty list."""
    try:
        msgs = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad("messages", "'messages' is not valid JSON.") from None
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise _bad("messages", "'messages' must be a non-empty JSON list of message objects.")
    return msgs


def parse_tools(raw: bytes | None) -> list[dict[str, Any]] | None:
    if raw is None or not raw.strip():
        return None
    try:
        tools = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad("tools", "'tools' is not valid JSON.") from None
    if not isinstance(tools, list):
        raise _bad("tools", "'tools' must be a JSON list.")
    return tools or None


# ---------------------------------------------------------------------------------------------- preprocess
@dataclass
class PreprocessResult:
    """input_ids int64 [L]; pixel_values float32 [N,3,S,S] (N = 0 for text-only); info (JSON-able)."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    info: dict[str, Any]


def _raw_prompt(ctx: EntryContext, raw: bytes) -> list[int]:
    """The `prompt` input (a JSON string or a list of token ids) → prompt ids, no chat template."""
    try:
        prompt = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad("prompt", "'prompt' is not valid JSON.") from None
    if isinstance(prompt, str):
        ids = ctx.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = ctx.cfg.llm.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise _bad("prompt", f"'prompt' token ids must be in [0, {vocab}).")
        ids = list(prompt)
    else:
        raise _bad("prompt", "'prompt' must be a string or a list of token ids.")
    if not ids:
        raise _bad("prompt", "'prompt' is empty.")
    if ctx.cfg.img_context_token_id in ids:
        raise _bad("prompt", "'prompt' must not contain image-context tokens (send images as chat messages).")
    return ids


def _raw_prompt_request(ctx: EntryContext, prompt_raw: bytes, params: RequestParams) -> PreprocessResult:
    from nemovl_trt.preprocess.errors import CONTEXT_LENGTH_EXCEEDED

    ids = _raw_prompt(ctx, prompt_raw)
    budget = ctx.max_seq_len - len(ids)
    max_tokens = params.max_tokens if params.max_tokens is not None else budget
    if budget < 1 or max_tokens > budget:
        raise PreprocessError(CONTEXT_LENGTH_EXCEEDED, f"The prompt has {len(ids)} tokens and max_tokens is "
                              f"{max_tokens}, more than the {ctx.max_seq_len}-token context window.",
                              param="max_tokens" if params.max_tokens is not None else "prompt")
    tile = ctx.cfg.force_image_size
    public = {"images": 0, "tiles": [], "frames": 0, "evs_pruned_tokens": 0, "warnings": [], "reasoning": False}
    info = {"public": public, "sampling": with_vocab(_sampling(params, max_tokens, False), ctx), "stop": params.stop,
            "video": None,
            "prompt_tokens": len(ids)}
    return PreprocessResult(input_ids=np.asarray(ids, dtype=np.int64),
                            pixel_values=np.zeros((0, 3, tile, tile), dtype=np.float32), info=info)


def _sampling(params: RequestParams, max_tokens: int, reasoning: bool) -> dict[str, Any]:
    """The llm's `sampling` JSON; a structured-output spec learns whether the prompt opened a thinking block."""
    sampling = {"max_new_tokens": int(max_tokens), "temperature": params.temperature, "top_p": params.top_p,
                "top_k": params.top_k, "seed": params.seed, "ignore_eos": params.ignore_eos, **params.extra}
    if "guided" in sampling and reasoning:
        sampling["guided"] = {**sampling["guided"], "reasoning": True}
    return sampling


def with_vocab(sampling: dict[str, Any], ctx: EntryContext) -> dict[str, Any]:
    """TensorRT-LLM's embedding_bias is a tensor over the vocabulary: a logit_bias request carries its size."""
    if "logit_bias" in sampling:
        sampling["vocab_size"] = ctx.cfg.llm.vocab_size
    return sampling


def preprocess_request(ctx: EntryContext, messages_raw: bytes | None, images: list[bytes], video: bytes | None,
                       tools_raw: bytes | None, params_raw: bytes | None,
                       prompt_raw: bytes | None = None) -> PreprocessResult:
    """Everything before the vision encoder. Raises PreprocessError for bad input or limits. With
    `prompt_raw` (a raw prompt), messages, media and tools are not used."""
    from nemovl_trt.preprocess import prompt as pp  # imports torch (via evs): only where needed
    from nemovl_trt.preprocess.image import preprocess_images
    from nemovl_trt.preprocess.video import preprocess_video

    try:
        params_obj = json.loads(params_raw.decode("utf-8")) if params_raw and params_raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad("params", "'params' is not valid JSON.") from None
    params = parse_request_params(params_obj, ctx)
    if prompt_raw is not None and prompt_raw.strip():
        return _raw_prompt_request(ctx, prompt_raw, params)
    messages = parse_messages(messages_raw)
    tools = parse_tools(tools_raw)
    cfg = ctx.cfg
    tile = cfg.force_image_size
    if len(images) > ctx.max_images:
        raise PreprocessError(TOO_MANY_IMAGES, f"The request has {len(images)} images; at most {ctx.max_images} "
                              f"are allowed.", param="messages")
    if images and video is not None:
        raise _bad("messages", "A request may carry images or one video, not both.")
    pixel_values = np.zeros((0, 3, tile, tile), dtype=np.float32)
    image_inputs: list[Any] = []
    video_input: Any = None
    public: dict[str, Any] = {"images": len(images), "tiles": [], "frames": 0, "evs_pruned_tokens": 0}
    if images:
        pixel_values, tiles = preprocess_images(images, params.max_num_tiles, cfg.norm_mean, cfg.norm_std,
                                                tile=tile, use_thumbnail=cfg.use_thumbnail)
        public["tiles"] = list(tiles)
        image_inputs = [pp.ImageInput(num_tiles=int(n)) for n in tiles]
    if video is not None:
        vt = preprocess_video(video, cfg.norm_mean, cfg.norm_std, tile=tile, fps=params.fps,
                              num_frames=params.num_frames, decoder=ctx.video_decoder)
        if vt.num_frames > ctx.max_video_frames:
            raise PreprocessError(INVALID_VIDEO_SAMPLING, f"The video sampling gives {vt.num_frames} frames; "
                                  f"at most {ctx.max_video_frames} are allowed.", param="media_io_kwargs")
        pixel_values = vt.pixel_values
        public["frames"] = vt.num_frames
        video_input = pp.VideoInput(timestamps=list(vt.timestamps), pruning_rate=params.video_pruning_rate)
    result = pp.build_prompt(messages, ctx.tokenizer, cfg, image_inputs, video_input, tools=tools,
                             max_tokens=params.max_tokens, max_seq_len=ctx.max_seq_len,
                             max_images=ctx.max_images)
    if video is not None and result.video is None:
        pixel_values = np.zeros((0, 3, tile, tile), dtype=np.float32)  # a video no message refers to
        public["frames"] = 0
    ids = np.asarray(result.input_ids, dtype=np.int64)
    public["warnings"] = list(result.warnings)
    public["reasoning"] = bool(result.reasoning)
    sampling = with_vocab(_sampling(params, result.max_tokens, bool(result.reasoning)), ctx)
    layout = None
    if result.video is not None:
        layout = {"layout": dataclasses.asdict(result.video), "pruning_rate": params.video_pruning_rate}
    info = {"public": public, "sampling": sampling, "stop": params.stop, "video": layout,
            "prompt_tokens": int(result.num_prompt_tokens)}
    return PreprocessResult(input_ids=ids, pixel_values=np.ascontiguousarray(pixel_values, dtype=np.float32),
                            info=info)


def apply_video_evs(ctx: EntryContext, input_ids: np.ndarray, embeddings: np.ndarray,
                    layout: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """EVS on the projected frame embeddings [T,P,D]: keep the retained tokens (original order) and rebuild
    the per-frame placeholder layout. Returns (input_ids [L], mm rows [R,D], pruned token count). With rate
    0 every token is kept and the ids are unchanged."""
    from nemovl_trt.preprocess import prompt as pp
    from nemovl_trt.preprocess.evs import evs_keep_mask, per_frame_counts

    q = float(layout.get("pruning_rate") or 0.0)
    t, p, d = embeddings.shape
    if q <= 0.0:
        return input_ids, embeddings.reshape(-1, d), 0
    mask = np.asarray(evs_keep_mask(embeddings, q), dtype=bool)
    kept = np.ascontiguousarray(embeddings[mask])
    vl = pp.VideoLayout(**layout["layout"])
    new_ids, _ = pp.rebuild_video_prompt([int(i) for i in input_ids], vl, per_frame_counts(mask))
    return np.asarray(new_ids, dtype=np.int64), kept, int(t * p - kept.shape[0])
