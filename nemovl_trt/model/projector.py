"""Pixel shuffle (docs/model.md §4.8) and the `mlp1` projector (§4.9).

Shape notation: N tiles, h×w ViT patch grid, C ViT hidden, r downsample ratio (0.5),
C' = C / r² shuffled width, D LLM hidden, F projector hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemovl_trt.checkpoint.config import VLMConfig
from nemovl_trt.model.norms import RMSNorm


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str = "v2") -> torch.Tensor:
    """InternVL pixel shuffle: [N,h,w,C] → [N, h·r, w·r, C/r²].

    Steps (r = 0.5): view [N,h,w·r,C/r] → permute(0,2,1,3) → view [N,w·r,h·r,C/r²] → (v2) permute(0,2,1,3).
    For r = 0.5 and v2 this is out[n,i,j,k] = x[n, 2i + k//(2C), 2j + (k//C)%2, k%C]: the channel
    blocks are the (dy,dx) = (0,0),(0,1),(1,0),(1,1) neighbours. v1 skips the last permute
    (transposed grid) and is not what the checkpoint was trained with.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"ps_version '{version}' is not supported (v1 or v2).")
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * ratio), int(c / ratio))  # [N,h,w·r,C/r]
    x = x.permute(0, 2, 1, 3)  # [N,w·r,h,C/r]
    x = x.reshape(n, int(w * ratio), int(h * ratio), int(c / (ratio * ratio)))  # [N,w·r,h·r,C/r²]
    if version == "v2":
        x = x.permute(0, 2, 1, 3)  # [N,h·r,w·r,C/r²]
    return x.contiguous()


class SquaredReLU(nn.Module):
    """`mlp1.2`: relu(x)²."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class Projector(nn.Sequential):
    """`mlp1`: 0 RMSNorm(C') → 1 Linear(C'→F, no bias) → 2 relu² → 3 Linear(F→D, no bias).

    The RMSNorm epsilon is the LLM's `layer_norm_epsilon` (1e-5 for the 12B, as docs/model.md §4.9 states;
    the checkpoint has no separate projector epsilon key).
    """

    def __init__(self, cfg: VLMConfig):
        super().__init__(
            RMSNorm(cfg.shuffled_dim, cfg.llm.layer_norm_epsilon),
            nn.Linear(cfg.shuffled_dim, cfg.projector_hidden_size, bias=False),
            SquaredReLU(),
            nn.Linear(cfg.projector_hidden_size, cfg.llm.hidden_size, bias=False),
        )
