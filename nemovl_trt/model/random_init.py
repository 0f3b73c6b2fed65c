"""Deterministic random initialisation of the reference modules in place, with value ranges that keep
the tiny models numerically interesting (used by tests and benchmarks that do not need a checkpoint;
real weights come from `nemovl_trt.checkpoint`)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def random_init_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Fill every parameter of `module` from a generator seeded with `seed` and return the module.

    Linear/conv/embedding weights ~ N(0, std); norm weights ~ 1 + N(0, 0.1); Mamba `dt_bias` is the
    inverse softplus of a log-uniform dt in [1e-3, 1e-1]; `A_log` = log(U[1, 16]); `D` ~ 1 + N(0, 0.1);
    biases ~ N(0, std). Buffers are left alone.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        shape = p.shape
        if leaf == "dt_bias":
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
            val = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif leaf == "A_log":
            val = torch.log(1 + 15 * torch.rand(shape, generator=g))
        elif leaf == "D" or (leaf == "weight" and p.dim() == 1):
            val = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            val = std * torch.randn(shape, generator=g)
        p.copy_(val.to(p.dtype))
    return module
