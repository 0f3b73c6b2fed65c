"""Prompt ids for training, made by the production prompt code (`preprocess.prompt.build_prompt`,
`preprocess.evs`, `rebuild_video_prompt`) exactly as the served `nemovl` model makes them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nemovl_trt.checkpoint.config import VLMConfig
from nemovl_trt.checkpoint.tokenizer import TokenizerBundle
from nemovl_trt.preprocess.evs import evs_keep_mask, per_frame_counts
from nemovl_trt.preprocess.prompt import ImageInput, VideoInput, build_prompt, rebuild_video_prompt


def image_prompt(tok: TokenizerBundle, cfg: VLMConfig, messages: list[dict[str, Any]],
                 tiles_per_image: list[int]) -> list[int]:
    """Prompt ids of an image request (each image expanded to tokens_per_tile × its tiles)."""
    return build_prompt(messages, tok, cfg, images=[ImageInput(num_tiles=n) for n in tiles_per_image]).input_ids


def video_prompt(tok: TokenizerBundle, cfg: VLMConfig, timestamps: Sequence[float], embeddings: torch.Tensor,
                 pruning_rate: float) -> tuple[torch.Tensor, Callable[[list[dict[str, Any]]], list[int]]]:
    """EVS on a video's projected embeddings and the matching prompt layout.

    Args:
        timestamps: seconds of the sampled frames (`VideoTiles.timestamps`).
        embeddings: ``[T, P, D]`` projected frame embeddings (EVS scores them; no gradient needed).
        pruning_rate: EVS rate q (0 keeps every token).

    Returns:
        (bool ``[T·P]`` keep mask over the flattened (t, p) rows, a function messages → prompt ids
        with each frame holding its own kept-token count).
    """
    mask = evs_keep_mask(embeddings, pruning_rate)
    counts = per_frame_counts(mask)
    info = VideoInput(timestamps=list(timestamps), pruning_rate=pruning_rate)

    def prompt_for(messages: list[dict[str, Any]]) -> list[int]:
        res = build_prompt(messages, tok, cfg, video=info)
        assert res.video is not None
        ids, _ = rebuild_video_prompt(res.input_ids, res.video, counts)
        return ids

    return torch.from_numpy(mask.reshape(-1)), prompt_for
