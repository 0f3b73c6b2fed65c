"""Memory plan: how a target's GPU memory splits for this checkpoint, the largest batch that fits, and the
decode roofline. Only the config is needed (no weights), so it runs on the real 12B config anywhere.

Every number is arithmetic on `VLMConfig` sizes and `TargetConfig` fields; the formulas are in
docs/build.md ("Memory plan") and repeated in the docstrings below. Units: bytes, tokens, sequences.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nemovl_trt.build.targets import PRECISION_BYTES, TargetConfig
from nemovl_trt.checkpoint.config import LLMConfig, VisionConfig, VLMConfig

GIB = 2**30
FP32_BYTES = 4  # Mamba conv + SSM state and logits are kept in fp32
FP8_SCALE_BYTES = 1  # NVFP4 block scale (e4m3)
NVFP4_BLOCK = 16  # weights per NVFP4 block scale
PER_TENSOR_SCALES_BYTES = 2 * FP32_BYTES  # FP8/NVFP4: one fp32 weight (global) scale + one fp32 input scale


@dataclass(frozen=True)
class LLMParams:
    """LLM parameter counts by role (numbers of elements)."""

    embedding: int  # vocab × hidden
    lm_head: int  # vocab × hidden (0 when tied)
    quantizable: int  # weights of the Linear layers inside the decoder layers (quantized to fp8/nvfp4)
    num_quantizable_linears: int
    other: int  # norms, conv1d, dt_bias, A_log, D, biases, norm_f (kept in 16-bit)

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.quantizable + self.other


def llm_params(llm: LLMConfig) -> LLMParams:
    """Count every LLM parameter from the config (docs/model.md §6.5 tensor list).

    Mamba layer: in_proj h×(2·d_inner + 2·g·N + H), conv1d conv_dim×k (+conv_dim bias), dt_bias/A_log/D H each,
    gated norm d_inner, out_proj d_inner×h. Attention: q h×(heads·hd), k,v h×(kv·hd), o (heads·hd)×h.
    MLP: up h×I, down I×h. Every layer also has one RMSNorm weight (h); plus norm_f (h).
    """
    h = llm.hidden_size
    quant = other = n_lin = 0
    for kind in llm.layer_types:
        other += h  # layers.ℓ.norm.weight
        if kind == "mamba":
            d_in, conv, heads = llm.mamba_d_inner, llm.mamba_conv_dim, llm.mamba_num_heads
            quant += h * llm.mamba_in_proj_dim + d_in * h
            n_lin += 2
            other += conv * llm.conv_kernel + (conv if llm.use_conv_bias else 0) + 3 * heads + d_in
            if llm.mamba_proj_bias:
                other += llm.mamba_in_proj_dim + h
        elif kind == "attention":
            q = llm.num_attention_heads * llm.head_dim
            kv = llm.num_key_value_heads * llm.head_dim
            quant += h * q + 2 * h * kv + q * h
            n_lin += 4
            if llm.attention_bias:
                other += q + 2 * kv + h
        else:  # mlp
            quant += 2 * h * llm.intermediate_size
            n_lin += 2
            if llm.mlp_bias:
                other += llm.intermediate_size + h
    other += h  # norm_f
    emb = llm.vocab_size * h
    return LLMParams(embedding=emb, lm_head=0 if llm.tie_word_embeddings else emb, quantizable=quant,
                     num_quantizable_linears=n_lin, other=other)


def vision_params(cfg: VLMConfig) -> int:
    """RADIO + mlp1 parameters (buffers such as input_conditioner mean/std are not counted).

    embedder 3·p²·D + pos_embed (cpe_max/p)²·D + cls_token (cls+registers)·D
    + per block [2 LayerNorms 4D, qkv D·3D+3D (bias if qkv_bias), proj D²+D, fc1 D·I+I, fc2 I·D+D]
    + mlp1: RMSNorm S + S·P + P·L  (S = shuffled dim, P = projector hidden, L = LLM hidden).
    """
    v: VisionConfig = cfg.vision
    d, i = v.hidden_size, v.intermediate_size
    n = 3 * v.patch_size**2 * d + v.pos_grid**2 * d + v.num_prefix_tokens * d
    block = 4 * d + 3 * d * d + (3 * d if v.qkv_bias else 0) + d * d + d + d * i + i + i * d + d
    n += v.num_hidden_layers * block
    s, p, ll = cfg.shuffled_dim, cfg.projector_hidden_size, cfg.llm.hidden_size
    return n + s + s * p + p * ll


def llm_weight_bytes(params: LLMParams, precision: str) -> int:
    """LLM weight bytes at a precision.

    fp32/bf16: every parameter × bytes(precision).
    fp8 (ModelOpt FP8): decoder Linear weights 1 byte + per Linear one fp32 weight scale and one fp32 input
    scale; embeddings, lm_head, norms, conv1d and SSM parameters stay bf16 (ModelOpt's default excludes).
    nvfp4 (ModelOpt NVFP4): decoder Linear weights 0.5 byte + one fp8 block scale per 16 weights + per Linear
    one fp32 global weight scale and one fp32 input scale; the rest bf16 as for fp8.
    """
    if precision in ("fp32", "bf16", "fp16"):
        return int(params.total * PRECISION_BYTES[precision])
    keep16 = (params.embedding + params.lm_head + params.other) * PRECISION_BYTES["bf16"]
    scales = params.num_quantizable_linears * PER_TENSOR_SCALES_BYTES
    if precision == "fp8":
        q = params.quantizable * PRECISION_BYTES["fp8"]
    elif precision == "nvfp4":
        q = params.quantizable * PRECISION_BYTES["nvfp4"] + math.ceil(params.quantizable / NVFP4_BLOCK) * FP8_SCALE_BYTES
    else:
        raise ValueError(f"unknown LLM precision '{precision}'.")
    return int(keep16 + q + scales)


def mamba_state_bytes_per_seq(llm: LLMConfig) -> int:
    """Σ over M layers of (conv_dim × (k − 1) + heads × head_dim × state) × 4 bytes (fp32 conv + SSM state)."""
    per_layer = llm.mamba_conv_dim * (llm.conv_kernel - 1) + llm.mamba_num_heads * llm.mamba_head_dim * llm.ssm_state_size
    return llm.num_layers_of["mamba"] * per_layer * FP32_BYTES


def kv_bytes_per_token(llm: LLMConfig, kv_dtype: str) -> int:
    """Σ over attention layers of 2 (K and V) × kv_heads × head_dim × bytes(kv cache dtype)."""
    per_layer = 2 * llm.num_key_value_heads * llm.head_dim * PRECISION_BYTES[kv_dtype]
    return int(llm.num_layers_of["attention"] * per_layer)


def activation_dtype(target: TargetConfig) -> str:
    """Compute dtype of activations: bf16 on GPU targets (fp8/nvfp4 GEMMs still take/produce bf16), else the
    LLM precision."""
    return "bf16" if target.is_gpu and target.llm_precision in ("fp8", "nvfp4") else target.llm_precision


def llm_activation_bytes(llm: LLMConfig, tokens: int, logits_rows: int, act_bytes: float) -> int:
    """Peak activations of one LLM forward pass over `tokens` tokens (layers run one after another, so only
    the widest layer is live at once):

    tokens × act_bytes × (2·hidden + max(2·intermediate, in_proj + conv_dim + d_inner, (heads+2·kv)·hd + heads·hd))
    + ceil(tokens / chunk_size) × heads × head_dim × state × 4   (chunked-scan states of one Mamba layer, fp32)
    + logits_rows × vocab × 4                                    (fp32 logits of the last token per sequence)
    """
    widths = [0]
    if llm.num_layers_of["mlp"]:
        widths.append(2 * llm.intermediate_size)
    if llm.num_layers_of["mamba"]:
        widths.append(llm.mamba_in_proj_dim + llm.mamba_conv_dim + llm.mamba_d_inner)
    if llm.num_layers_of["attention"]:
        q = llm.num_attention_heads * llm.head_dim
        widths.append(q + 2 * llm.num_key_value_heads * llm.head_dim + q)
    per_token = 2 * llm.hidden_size + max(widths)
    scan = 0
    if llm.num_layers_of["mamba"]:
        scan = (math.ceil(tokens / llm.chunk_size) * llm.mamba_num_heads * llm.mamba_head_dim
                * llm.ssm_state_size * FP32_BYTES)
    return int(tokens * per_token * act_bytes) + scan + logits_rows * llm.vocab_size * FP32_BYTES


def vision_max_batch_tiles(cfg: VLMConfig, target: TargetConfig) -> int:
    """Tiles of the largest image batch of one request: max_images × (max_num_tiles + thumbnail). Video frames
    (one tile each) are encoded in chunks of this size."""
    per_image = target.limits.max_num_tiles + (1 if cfg.use_thumbnail and target.limits.max_num_tiles > 1 else 0)
    return target.limits.max_images * per_image


def vision_activation_bytes(cfg: VLMConfig, tiles: int, act_bytes: float) -> int:
    """Peak activations of the vision encoder over `tiles` tiles (fused attention: no seq² score matrix):

    tiles × (prefix + patches) × (2·D + max(4·D, I)) × bytes      (ViT block: residual + LN out + qkv/attn or MLP)
    + tiles × tokens_per_tile × (S + P + L) × bytes               (projector: shuffled in, hidden, out)
    """
    v = cfg.vision
    seq = v.num_prefix_tokens + cfg.patches_per_side**2
    vit = tiles * seq * (2 * v.hidden_size + max(4 * v.hidden_size, v.intermediate_size))
    proj = tiles * cfg.tokens_per_tile * (cfg.shuffled_dim + cfg.projector_hidden_size + cfg.llm.hidden_size)
    return int((vit + proj) * act_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    """The plan for one checkpoint on one target. All sizes in bytes unless the name says otherwise."""

    target: str
    llm_precision: str
    vision_precision: str
    kv_cache_dtype: str
    activation_dtype: str
    gpu_memory_bytes: int
    memory_fraction: float
    memory_budget_bytes: int  # gpu_memory × memory_fraction
    hbm_bandwidth_gbps: float
    llm_params: int
    llm_quantized_params: int
    vision_params: int
    llm_weights_bytes: int
    vision_weights_bytes: int
    weights_bytes: int  # llm + vision
    mamba_state_bytes_per_seq: int
    kv_bytes_per_token: int
    max_seq_len: int  # min(target limit, checkpoint max_sequence_length)
    max_num_tokens: int
    cache_bytes_per_seq: int  # mamba state + max_seq_len × kv_bytes_per_token
    llm_activation_bytes: int
    vision_max_batch_tiles: int
    vision_activation_bytes: int
    activation_bytes: int  # llm + vision
    max_batch_size: int  # largest batch whose caches fit at max_seq_len (0: the weights alone do not fit)
    max_batch_size_configured: int  # the target's cap
    engine_max_batch_size: int  # min(fit, cap): what the engines are built for
    cache_bytes: int  # engine_max_batch_size × cache_bytes_per_seq
    free_bytes: int  # budget − weights − activations − cache
    decode_context_len: int  # mean context in the decode roofline: decode_context_fraction × max_seq_len
    decode_bytes_per_step: int  # llm weights + B × (mamba + ctx × kv), B = engine_max_batch_size
    decode_tokens_per_s_bound: float  # B × bandwidth / decode_bytes_per_step
    decode_tokens_per_s_bound_batch1: float

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(cfg: VLMConfig, target: TargetConfig) -> MemoryPlan:
    """Compute the memory plan of `cfg` on `target` (formulas in the module docs and docs/build.md)."""
    llm = cfg.llm
    lp = llm_params(llm)
    vparams = vision_params(cfg)
    llm_w = llm_weight_bytes(lp, target.llm_precision)
    vis_w = int(vparams * PRECISION_BYTES[target.vision_precision])
    weights = llm_w + vis_w

    mamba = mamba_state_bytes_per_seq(llm)
    kv = kv_bytes_per_token(llm, target.kv_cache_dtype)
    max_seq = min(target.limits.max_seq_len, cfg.max_sequence_length)
    tokens = target.limits.max_num_tokens
    cap = target.limits.max_batch_size
    act_dt = activation_dtype(target)
    llm_act = llm_activation_bytes(llm, tokens, min(tokens, cap), PRECISION_BYTES[act_dt])
    tiles = vision_max_batch_tiles(cfg, target)
    vis_act = vision_activation_bytes(cfg, tiles, PRECISION_BYTES[target.vision_precision])
    activations = llm_act + vis_act

    mem = int(target.gpu_memory_gib * GIB)
    budget = int(mem * target.memory_fraction)
    per_seq = mamba + max_seq * kv
    room = budget - weights - activations
    fit = max(0, room // per_seq) if per_seq > 0 else cap
    engine_b = min(fit, cap)

    ctx = int(target.decode_context_fraction * max_seq)
    bw = target.hbm_bandwidth_gbps * 1e9

    def step_bytes(b: int) -> int:
        return llm_w + b * (mamba + ctx * kv)

    decode_b = engine_b
    bound = decode_b * bw / step_bytes(decode_b) if decode_b > 0 else 0.0
    bound1 = bw / step_bytes(1)
    return MemoryPlan(
        target=target.name, llm_precision=target.llm_precision, vision_precision=target.vision_precision,
        kv_cache_dtype=target.kv_cache_dtype, activation_dtype=act_dt, gpu_memory_bytes=mem,
        memory_fraction=target.memory_fraction, memory_budget_bytes=budget,
        hbm_bandwidth_gbps=target.hbm_bandwidth_gbps, llm_params=lp.total, llm_quantized_params=lp.quantizable,
        vision_params=vparams, llm_weights_bytes=llm_w, vision_weights_bytes=vis_w, weights_bytes=weights,
        mamba_state_bytes_per_seq=mamba, kv_bytes_per_token=kv, max_seq_len=max_seq, max_num_tokens=tokens,
        cache_bytes_per_seq=per_seq, llm_activation_bytes=llm_act, vision_max_batch_tiles=tiles,
        vision_activation_bytes=vis_act, activation_bytes=activations, max_batch_size=int(fit),
        max_batch_size_configured=cap, engine_max_batch_size=int(engine_b), cache_bytes=int(engine_b * per_seq),
        free_bytes=int(room - engine_b * per_seq), decode_context_len=ctx,
        decode_bytes_per_step=step_bytes(decode_b), decode_tokens_per_s_bound=round(bound, 1),
        decode_tokens_per_s_bound_batch1=round(bound1, 1),
    )


def _gb(n: int) -> str:
    """Bytes as GB (1e9) with 2 decimals, or MB below 1 GB."""
    return f"{n / 1e9:,.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:,.2f} MB"


def format_plan(p: MemoryPlan) -> str:
    """Human-readable plan (what `nemovl-build plan` prints)."""
    rows = [
        ("target", f"{p.target} (llm {p.llm_precision}, vision {p.vision_precision}, kv cache {p.kv_cache_dtype})"),
        ("memory budget", f"{_gb(p.memory_budget_bytes)} = {_gb(p.gpu_memory_bytes)} × {p.memory_fraction}"),
        ("weights_bytes", f"{_gb(p.weights_bytes)} (llm {_gb(p.llm_weights_bytes)} for {p.llm_params:,} params, "
                          f"vision {_gb(p.vision_weights_bytes)} for {p.vision_params:,} params)"),
        ("activation_bytes", f"{_gb(p.activation_bytes)} (llm {_gb(p.llm_activation_bytes)} at "
                             f"{p.max_num_tokens} tokens, vision {_gb(p.vision_activation_bytes)} at "
                             f"{p.vision_max_batch_tiles} tiles)"),
        ("mamba_state_bytes_per_seq", f"{p.mamba_state_bytes_per_seq:,} ({p.mamba_state_bytes_per_seq / 2**20:,.1f} MiB)"),
        ("kv_bytes_per_token", f"{p.kv_bytes_per_token:,}"),
        ("cache per sequence", f"{_gb(p.cache_bytes_per_seq)} at max_seq_len {p.max_seq_len}"),
        ("max_batch_size", f"{p.max_batch_size} fit; configured cap {p.max_batch_size_configured}; "
                           f"engines built for {p.engine_max_batch_size}"),
        ("free after caches", _gb(p.free_bytes)),
        ("decode_tokens_per_s_bound", f"{p.decode_tokens_per_s_bound:,.1f} tok/s at batch {p.engine_max_batch_size}, "
                                      f"context {p.decode_context_len} ({p.decode_tokens_per_s_bound_batch1:,.1f} "
                                      f"tok/s at batch 1)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
