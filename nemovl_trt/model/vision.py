"""The whole vision path of one batch of tiles: RADIO → drop prefix → pixel shuffle → mlp1
(docs/model.md §4). [N,3,S,S] normalised pixels → [N, tokens_per_tile, llm_hidden]."""

from __future__ import annotations

import torch
from torch import nn

from nemovl_trt.checkpoint.config import VLMConfig
from nemovl_trt.model.projector import Projector, pixel_shuffle
from nemovl_trt.model.radio import RadioVisionModel


class VisionEncoder(nn.Module):
    """State-dict names `vision_model.*` and `mlp1.*`, as in the checkpoint."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = RadioVisionModel(cfg.vision)
        self.mlp1 = Projector(cfg)

    def tile_position_embedding(self) -> torch.Tensor:
        """The precomputed CPE for one `force_image_size` tile: [1, patches_per_side², vit_hidden]."""
        return self.vision_model.tile_position_embedding(self.cfg.force_image_size)

    def forward(self, pixels: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [N,3,S,S] (normalised, any float dtype) → [N, tokens_per_tile, llm_hidden] in the
        projector's dtype. `pos` optionally overrides the CPE with a precomputed [1,h·w,vit_hidden]."""
        side = self.cfg.force_image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (side, side):
            raise ValueError(f"expected pixels [N,3,{side},{side}], got {list(pixels.shape)}.")
        feats = self.vision_model(pixels, pos)  # [N,h·w,C]
        return self.mlp1(shuffle_tokens(feats, self.cfg))  # [N,tokens_per_tile,D]


def shuffle_tokens(feats: torch.Tensor, cfg: VLMConfig) -> torch.Tensor:
    """RADIO's patch tokens of whole tiles → pixel-shuffled tokens, the projector's input:
    [N, h·w, C] (row-major, h = w = patches_per_side) → [N, tokens_per_tile, C']."""
    n, _, c = feats.shape
    g = cfg.patches_per_side
    grid = feats.reshape(n, g, g, c)  # [N,h,w,C] row-major
    shuffled = pixel_shuffle(grid, cfg.downsample_ratio, cfg.ps_version)  # [N,h·r,w·r,C']
    return shuffled.reshape(n, -1, shuffled.shape[-1])  # [N,tokens_per_tile,C']
