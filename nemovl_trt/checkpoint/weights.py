"""The tensors of a `NemotronH_Nano_VL_V2` checkpoint (docs/model.md §4.11 and §6.5): names, shapes, dtype kinds,
and a deterministic random initialisation for the tiny checkpoints.

Every shape is computed from the `VLMConfig`; nothing here knows the 12B's sizes.
"""

from __future__ import annotations

import math
import zlib

import torch

from nemovl_trt.checkpoint.config import VLMConfig

VISION_PREFIX = "vision_model.radio_model."
VIT_PREFIX = VISION_PREFIX + "model."
PATCH_GEN = VIT_PREFIX + "patch_generator."
PROJECTOR_PREFIX = "mlp1."
LLM_PREFIX = "language_model."
BACKBONE = LLM_PREFIX + "backbone."

CLS_TOKEN = PATCH_GEN + "cls_token.token"
POS_EMBED = PATCH_GEN + "pos_embed"
EMBEDDER = PATCH_GEN + "embedder.weight"
SUMMARY_IDXS = VISION_PREFIX + "summary_idxs"
NORM_MEAN = VISION_PREFIX + "input_conditioner.norm_mean"
NORM_STD = VISION_PREFIX + "input_conditioner.norm_std"
EMBEDDINGS = BACKBONE + "embeddings.weight"
LM_HEAD = LLM_PREFIX + "lm_head.weight"

# Initialisation scales of the random tiny checkpoints. Linear weights use N(0, 1/fan_in) and the vectors
# written into the residual streams N(0, 1), so every layer changes its input by O(1): with the usual
# N(0, 0.02) the tiny LLM's greedy output ignored the prompt (measured: the same 10 tokens for every prompt).
EMBED_STD = 1.0  # token embeddings, the CPE position grid, the CLS/register prefix tokens
BIAS_STD = 0.02  # every bias
NORM_WEIGHT_STD = 0.05  # norm weights are 1 + N(0, this): not exactly 1, so a forgotten weight is caught
A_INIT_RANGE = (1.0, 16.0)  # A = -uniform(1, 16) → A_log = log(uniform(1, 16)) (Mamba2 init)
# dt init range when llm_config lacks time_step_min/max/floor (the transformers NemotronHConfig defaults)
DT_INIT_DEFAULTS = {"time_step_min": 1e-3, "time_step_max": 1e-1, "time_step_floor": 1e-4}


def num_summary_idxs(cfg: VLMConfig) -> int:
    """Length of RADIO's `summary_idxs` buffer: `vision_config.args.summary_idxs` when the config lists
    them, else one per CLS token."""
    listed = (cfg.raw.get("vision_config", {}).get("args") or {}).get("summary_idxs")
    return len(listed) if isinstance(listed, list) else cfg.vision.num_cls_tokens


def vision_tensors(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """RADIO ViT tensors (docs/model.md §4.11): patch generator, blocks, input-conditioner buffers."""
    v = cfg.vision
    d, p = v.hidden_size, v.patch_size
    out: dict[str, tuple[int, ...]] = {
        EMBEDDER: (d, 3 * p * p),
        POS_EMBED: (1, v.pos_grid * v.pos_grid, d),
        CLS_TOKEN: (v.num_prefix_tokens, d),
    }
    for i in range(v.num_hidden_layers):
        b = f"{VIT_PREFIX}blocks.{i}."
        out[b + "norm1.weight"] = (d,)
        out[b + "norm1.bias"] = (d,)
        out[b + "attn.qkv.weight"] = (3 * d, d)
        if v.qkv_bias:
            out[b + "attn.qkv.bias"] = (3 * d,)
        out[b + "attn.proj.weight"] = (d, d)
        out[b + "attn.proj.bias"] = (d,)
        out[b + "norm2.weight"] = (d,)
        out[b + "norm2.bias"] = (d,)
        out[b + "mlp.fc1.weight"] = (v.intermediate_size, d)
        out[b + "mlp.fc1.bias"] = (v.intermediate_size,)
        out[b + "mlp.fc2.weight"] = (d, v.intermediate_size)
        out[b + "mlp.fc2.bias"] = (d,)
    out[NORM_MEAN] = (3, 1, 1)
    out[NORM_STD] = (3, 1, 1)
    out[SUMMARY_IDXS] = (num_summary_idxs(cfg),)
    return out


def projector_tensors(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """`mlp1` = RMSNorm(shuffled_dim) → Linear(shuffled→projector_hidden) → ReLU² → Linear(→llm_hidden)."""
    return {
        PROJECTOR_PREFIX + "0.weight": (cfg.shuffled_dim,),
        PROJECTOR_PREFIX + "1.weight": (cfg.projector_hidden_size, cfg.shuffled_dim),
        PROJECTOR_PREFIX + "3.weight": (cfg.llm.hidden_size, cfg.projector_hidden_size),
    }


def llm_tensors(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """Nemotron-H tensors (docs/model.md §6.5), one mixer per layer by `hybrid_override_pattern`."""
    c = cfg.llm
    h = c.hidden_size
    out: dict[str, tuple[int, ...]] = {EMBEDDINGS: (c.vocab_size, h)}
    for i, kind in enumerate(c.layer_types):
        pre = f"{BACKBONE}layers.{i}."
        mx = pre + "mixer."
        out[pre + "norm.weight"] = (h,)
        if kind == "mamba":
            out[mx + "in_proj.weight"] = (c.mamba_in_proj_dim, h)
            if c.mamba_proj_bias:
                out[mx + "in_proj.bias"] = (c.mamba_in_proj_dim,)
            out[mx + "conv1d.weight"] = (c.mamba_conv_dim, 1, c.conv_kernel)
            if c.use_conv_bias:
                out[mx + "conv1d.bias"] = (c.mamba_conv_dim,)
            out[mx + "dt_bias"] = (c.mamba_num_heads,)
            out[mx + "A_log"] = (c.mamba_num_heads,)
            out[mx + "D"] = (c.mamba_num_heads,)
            out[mx + "norm.weight"] = (c.mamba_d_inner,)
            out[mx + "out_proj.weight"] = (h, c.mamba_d_inner)
            if c.mamba_proj_bias:
                out[mx + "out_proj.bias"] = (h,)
        elif kind == "attention":
            q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            for name, rows, cols in (("q_proj", q_dim, h), ("k_proj", kv_dim, h), ("v_proj", kv_dim, h),
                                     ("o_proj", h, q_dim)):
                out[mx + name + ".weight"] = (rows, cols)
                if c.attention_bias:
                    out[mx + name + ".bias"] = (rows,)
        else:  # mlp
            out[mx + "up_proj.weight"] = (c.intermediate_size, h)
            out[mx + "down_proj.weight"] = (h, c.intermediate_size)
            if c.mlp_bias:
                out[mx + "up_proj.bias"] = (c.intermediate_size,)
                out[mx + "down_proj.bias"] = (h,)
    out[BACKBONE + "norm_f.weight"] = (h,)
    if not c.tie_word_embeddings:
        out[LM_HEAD] = (c.vocab_size, h)
    return out


def expected_tensors(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the checkpoint with its shape, in a fixed order (vision, projector, LLM)."""
    return {**vision_tensors(cfg), **projector_tensors(cfg), **llm_tensors(cfg)}


def integer_tensors(cfg: VLMConfig) -> set[str]:
    """Tensors stored as integers (int64 in the real checkpoint); every other tensor is floating point."""
    return {SUMMARY_IDXS}


def optional_tensors(cfg: VLMConfig) -> set[str]:
    """Tensors a loader accepts as absent: RADIO's buffers (inference normalizes in the preprocessor and
    never reads summary_idxs) and, for tied embeddings, a saved lm_head."""
    out = {SUMMARY_IDXS, NORM_MEAN, NORM_STD}
    if cfg.llm.tie_word_embeddings:
        out.add(LM_HEAD)
    return out


def extra_allowed_tensors(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """Tensors not in `expected_tensors` that a checkpoint may still carry (lm_head with tied embeddings)."""
    return {LM_HEAD: (cfg.llm.vocab_size, cfg.llm.hidden_size)} if cfg.llm.tie_word_embeddings else {}


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


def _init_one(name: str, shape: tuple[int, ...], cfg: VLMConfig, gen: torch.Generator) -> torch.Tensor:
    llm = cfg.raw.get("llm_config", {})
    leaf = name.rsplit(".", 1)[-1]
    if name == SUMMARY_IDXS:
        return torch.arange(shape[0], dtype=torch.int64)
    if name == NORM_MEAN:
        return torch.tensor(cfg.norm_mean, dtype=torch.float32).view(shape)
    if name == NORM_STD:
        return torch.tensor(cfg.norm_std, dtype=torch.float32).view(shape)
    if leaf == "A_log":
        lo, hi = A_INIT_RANGE
        return torch.log(torch.empty(shape).uniform_(lo, hi, generator=gen))
    if leaf == "dt_bias":
        dt_min, dt_max, floor = (float(llm.get(k, v)) for k, v in DT_INIT_DEFAULTS.items())
        u = torch.rand(shape, generator=gen)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        return _inverse_softplus(dt)
    if leaf == "D":
        return torch.ones(shape)
    if name.endswith("conv1d.weight"):
        bound = 1.0 / math.sqrt(shape[-1])  # PyTorch's default for a depthwise conv: fan_in = kernel
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    is_norm = (".norm" in name or name.startswith(PROJECTOR_PREFIX + "0.")) and leaf == "weight"
    if is_norm:
        return 1.0 + NORM_WEIGHT_STD * torch.randn(shape, generator=gen)
    if leaf == "bias":
        return BIAS_STD * torch.randn(shape, generator=gen)
    if name in (EMBEDDINGS, POS_EMBED, CLS_TOKEN):
        return EMBED_STD * torch.randn(shape, generator=gen)
    fan_in = shape[-1]  # Linear weights [out, in]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def init_weights(cfg: VLMConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every tensor of `expected_tensors(cfg)` (float32, int64 for the
    summary indices). Each tensor draws from its own generator seeded by (seed, name), so the values do not
    depend on the order or on which other tensors exist.

    Scales: linear weights N(0, 1/fan_in); token embeddings, position grid and prefix tokens N(0, 1);
    biases N(0, 0.02); norm weights 1 + N(0, 0.05); Mamba A_log =
    log U[1, 16], dt_bias = softplus⁻¹(dt) with dt log-uniform in [time_step_min, time_step_max], D = 1,
    conv1d U(±1/√kernel); input-conditioner buffers = the config's norm mean/std.
    """
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_tensors(cfg).items():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        t = _init_one(name, shape, cfg, gen)
        assert tuple(t.shape) == shape, (name, t.shape, shape)
        out[name] = t.contiguous()
    return out
