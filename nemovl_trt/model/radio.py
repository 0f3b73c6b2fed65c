"""RADIO ViT (C-RADIOv2 family) as used by Nemotron Nano VL, docs/model.md §4.1–4.6.

State-dict names (under the checkpoint prefix `vision_model.`):
  radio_model.model.patch_generator.embedder.weight   [hid, 3·p·p]   Linear, no bias
  radio_model.model.patch_generator.pos_embed         [1, G·G, hid]  CPE grid, G = cpe_max_size / p
  radio_model.model.patch_generator.cls_token.token   [Pfx, hid]     cls + register tokens
  radio_model.model.blocks.{i}.{norm1,norm2}.{weight,bias}, .attn.qkv.{weight,bias},
  .attn.proj.{weight,bias}, .mlp.fc1.{weight,bias}, .mlp.fc2.{weight,bias}
  radio_model.input_conditioner.{norm_mean,norm_std}, radio_model.summary_idxs   (buffers; loaded, unused)

Input normalisation is done by the preprocessor ((x/255 − mean)/std), never by `input_conditioner`,
whose buffers exist only so the checkpoint loads strictly.

Shape notation: N tiles, S = tile side in pixels, p patch size, h·w patch grid, Pfx prefix tokens,
hid ViT hidden size, nh heads, d head dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nemovl_trt.checkpoint.config import VisionConfig


class ClsToken(nn.Module):
    """Holds the prefix tokens (`cls_token.token` [Pfx, hid]); they get no position embedding."""

    def __init__(self, num_tokens: int, hidden: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(num_tokens, hidden))


class PatchGenerator(nn.Module):
    """Patchify + Linear embed + CPE position embedding + prefix tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.pos_grid  # G
        self.align_corners = cfg.pos_embed_align_corners
        self.embedder = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, cfg.hidden_size))
        self.cls_token = ClsToken(cfg.num_prefix_tokens, cfg.hidden_size)

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S'] → [N, h·w, 3·p·p]: patches row-major, inside a patch (channel, y, x) order
        (einops `b c (py yy) (px xx) -> b (py px) (c yy xx)`, i.e. a stride-p Conv2d without bias)."""
        n, c, hh, ww = pixels.shape
        p = self.patch_size
        x = pixels.reshape(n, c, hh // p, p, ww // p, p)  # [N,c,h,p,w,p]
        x = x.permute(0, 2, 4, 1, 3, 5)  # [N,h,w,c,p,p]
        return x.reshape(n, (hh // p) * (ww // p), c * p * p)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """CPE for an h×w patch grid → [1, h·w, hid] (fp32 compute, parameter dtype out).

        The G×G grid is bilinearly resampled to max(h,w)² (align_corners from the config: False in
        Megatron-Core/TRT-LLM/current vLLM, True in NVlabs RADIO and llama.cpp), cropped top-left to
        h×w, and resampled again to h×w only if the crop still differs (never for square tiles).
        """
        hid = self.pos_embed.shape[-1]
        grid = self.pos_embed.float().reshape(1, self.grid, self.grid, hid).permute(0, 3, 1, 2)  # [1,hid,G,G]
        side = max(h, w)
        if side != self.grid:
            grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=self.align_corners)
        grid = grid[:, :, :h, :w]
        if grid.shape[-2:] != (h, w):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=self.align_corners)
        return grid.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)  # [1,h·w,hid]

    def forward(self, pixels: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [N,3,S,S'] → tokens [N, Pfx + h·w, hid]. `pos` [1,h·w,hid] overrides the CPE
        (e.g. a precomputed constant)."""
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        x = self.embedder(self.patchify(pixels.to(self.embedder.weight.dtype)))  # [N,h·w,hid]
        x = x + (self.position_embedding(h, w) if pos is None else pos.to(x.dtype))
        prefix = self.cls_token.token[None].expand(x.shape[0], -1, -1).to(x.dtype)  # [N,Pfx,hid]
        return torch.cat([prefix, x], dim=1)


class ViTAttention(nn.Module):
    """Bidirectional MHA with fused qkv (output split [q|k|v]) and an output projection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.nh = cfg.num_attention_heads
        self.d = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N,T,hid] → [N,T,hid]."""
        n, t, hid = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.nh, self.d).permute(2, 0, 3, 1, 4)  # [3,N,nh,T,d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.d ** -0.5  # [N,nh,T,T]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)  # [N,nh,T,d]
        return self.proj(out.transpose(1, 2).reshape(n, t, hid))


class ViTMLP(nn.Module):
    """fc1 → GELU → fc2.

    GELU is the exact (erf) form, as HF/timm and vLLM use. Megatron's training config names
    `fast_gelu` (tanh approximation); which one the 12B was trained with is unverified (docs/model.md §1.3) —
    the difference is ≲1e-3 per activation.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm block: x += attn(LN1(x)); x += mlp(LN2(x)). No LayerScale."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """`radio_model.model`: patch generator + blocks; no final norm (model_norm is false)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_generator = PatchGenerator(cfg)
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.num_hidden_layers)])


class InputConditioner(nn.Module):
    """Holds RADIO's normalisation buffers so the checkpoint loads; never applied (the preprocessor
    normalises). Buffer shapes are taken from the checkpoint at load time."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("norm_mean", torch.zeros(3, 1, 1))
        self.register_buffer("norm_std", torch.ones(3, 1, 1))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        _adopt_buffer_shapes(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RadioModel(nn.Module):
    """`radio_model`: the ViT, the (unused) input conditioner and `summary_idxs`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.model = ViT(cfg)
        self.input_conditioner = InputConditioner()
        self.register_buffer("summary_idxs", torch.arange(cfg.num_cls_tokens, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        _adopt_buffer_shapes(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _adopt_buffer_shapes(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Resize `module`'s own buffers to the checkpoint's (their content is unused, their shapes vary)."""
    for name, buf in list(module.named_buffers(recurse=False)):
        src = state_dict.get(prefix + name)
        if isinstance(src, torch.Tensor) and (src.shape != buf.shape or src.dtype != buf.dtype):
            module.register_buffer(name, torch.empty_like(src, device=buf.device))


class RadioVisionModel(nn.Module):
    """`vision_model`: pixels [N,3,S,S'] (already normalised) → patch features [N, h·w, hid] with the
    prefix tokens dropped."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.radio_model = RadioModel(cfg)

    @property
    def patch_generator(self) -> PatchGenerator:
        return self.radio_model.model.patch_generator

    def tile_position_embedding(self, tile_size: int) -> torch.Tensor:
        """The CPE for a square tile of `tile_size` pixels: [1, (tile_size/p)², hid]. Constant for a
        fixed tile, so an ONNX export can fold it."""
        side = tile_size // self.cfg.patch_size
        return self.patch_generator.position_embedding(side, side)

    def forward(self, pixels: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [N,3,S,S'] → [N, h·w, hid] (prefix tokens dropped, no final norm)."""
        x = self.patch_generator(pixels, pos)  # [N,Pfx+h·w,hid]
        for block in self.radio_model.model.blocks:
            x = block(x)
        return x[:, self.patch_generator.cls_token.token.shape[0]:]
