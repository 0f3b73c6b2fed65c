"""RMSNorm shared by the LLM (per-layer norms, norm_f) and the projector (`mlp1.0`)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """w · x · rsqrt(mean(x²) + eps), computed in fp32 (weight multiply too), cast back."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] → [..., H] in x's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)
