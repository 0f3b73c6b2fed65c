"""Memory plan: how a target's GPU memory splits for this checkpoint, the largest batch that fits, and the
decode roofline. Only the config is needed (no weights), so it runs on the real 12B config anywhere.

Multi-GPU (the target's `parallel:` / `--tp --pp`): the plan is per GPU, with the LLM split the way TensorRT-LLM
splits NemotronH (tensor parallel: heads, KV heads, Mamba heads/groups/channels, MLP, vocabulary; pipeline
parallel: layers per stage), the vision engine whole on every GPU; the replica's batch is what fits on the
tightest GPU. Every number is arithmetic on `VLMConfig` sizes and `TargetConfig` fields; the formulas are in
docs/build.md ("Memory plan", "Multi-GPU plan") and repeated in the docstrings below. Units: bytes, tokens,
sequences.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from nemovl_trt.build.targets import MAX_WORLD_SIZE, PRECISION_BYTES, ParallelOptions, TargetConfig
from nemovl_trt.checkpoint.config import LLMConfig, VisionConfig, VLMConfig

GIB = 2**30
FP32_BYTES = 4  # Mamba conv + SSM state and logits are kept in fp32
FP8_SCALE_BYTES = 1  # NVFP4 block scale (e4m3)
NVFP4_BLOCK = 16  # weights per NVFP4 block scale
PER_TENSOR_SCALES_BYTES = 2 * FP32_BYTES  # FP8/NVFP4: one fp32 weight (global) scale + one fp32 input scale


@dataclass(frozen=True)
class LLMParams:
    """LLM parameter counts by role (numbers of elements), for the whole model or for what one GPU holds."""

    embedding: int  # vocab × hidden (per GPU: ⌈vocab / tp⌉ × hidden on the first pipeline stage, else 0)
    lm_head: int  # vocab × hidden (0 when tied; per GPU: ⌈vocab / tp⌉ × hidden on the last stage)
    quantizable: int  # weights of the Linear layers inside the decoder layers (quantized to fp8/nvfp4)
    num_quantizable_linears: int
    other: int  # norms, conv1d, dt_bias, A_log, D, biases, norm_f (kept in 16-bit)

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.quantizable + self.other


def llm_params(llm: LLMConfig, tp: int = 1, layers: range | None = None, first: bool = True,
               last: bool = True) -> LLMParams:
    """Count the LLM parameters one GPU holds (tp = 1, every layer, first and last stage: the whole model;
    docs/model.md §6.5 tensor list).

    Mamba layer: in_proj h×(2·d_inner + 2·g·N + H), conv1d conv_dim×k (+conv_dim bias), dt_bias/A_log/D H each,
    gated norm d_inner, out_proj d_inner×h. Attention: q h×(heads·hd), k,v h×(kv·hd), o (heads·hd)×h.
    MLP: up h×I, down I×h. Every layer also has one RMSNorm weight (h); plus norm_f (h).

    Tensor parallel, as TensorRT-LLM splits NemotronH (modeling_nemotron_h.py@00620eb0, mamba2_mixer.py@02140fd4,
    attention.py / embedding.py / modeling_utils.py, docs/build.md "Multi-GPU"): every Mamba tensor that has a
    head, group or channel axis (in_proj column, conv1d, A, D, dt_bias, gated norm, out_proj row) /tp;
    q/k/v column and o row /tp; up column and down row /tp; embedding and lm_head vocab-parallel ⌈V/tp⌉ rows;
    the per-layer RMSNorm, norm_f and row-parallel biases whole on every rank. `tp` must divide those axes
    (`check_parallel`). Pipeline parallel: only `layers`; the embedding on the first stage, lm_head and norm_f
    on the last (a tied lm_head keeps the embedding on the last stage too).
    """
    h = llm.hidden_size
    kinds = llm.layer_types
    quant = other = n_lin = 0
    for i in layers if layers is not None else range(len(kinds)):
        kind = kinds[i]
        other += h  # layers.ℓ.norm.weight: replicated
        if kind == "mamba":
            d_in, conv, heads = llm.mamba_d_inner, llm.mamba_conv_dim, llm.mamba_num_heads
            quant += (h * llm.mamba_in_proj_dim + d_in * h) // tp
            n_lin += 2
            other += (conv * llm.conv_kernel + (conv if llm.use_conv_bias else 0) + 3 * heads + d_in) // tp
            if llm.mamba_proj_bias:
                other += llm.mamba_in_proj_dim // tp + h
        elif kind == "attention":
            q = llm.num_attention_heads * llm.head_dim
            kv = llm.num_key_value_heads * llm.head_dim
            quant += (h * q + 2 * h * kv + q * h) // tp
            n_lin += 4
            if llm.attention_bias:
                other += (q + 2 * kv) // tp + h
        else:  # mlp
            quant += 2 * h * llm.intermediate_size // tp
            n_lin += 2
            if llm.mlp_bias:
                other += llm.intermediate_size // tp + h
    if last:
        other += h  # norm_f
    emb = math.ceil(llm.vocab_size / tp) * h  # vocab-parallel: the last rank's slice is padded
    embedding = emb if first else 0
    lm_head = emb if last and not (llm.tie_word_embeddings and first) else 0
    return LLMParams(embedding=embedding, lm_head=lm_head, quantizable=quant, num_quantizable_linears=n_lin,
                     other=other)


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


def mamba_state_bytes_per_seq(llm: LLMConfig, tp: int = 1, num_mamba_layers: int | None = None) -> int:
    """Σ over M layers of (conv_dim/tp × (k − 1) + heads/tp × head_dim × state) × 4 bytes (fp32 conv + SSM
    state; per GPU: each rank keeps the state of its own heads and channels). Default: every M layer."""
    n = llm.num_layers_of["mamba"] if num_mamba_layers is None else num_mamba_layers
    per_layer = (llm.mamba_conv_dim // tp * (llm.conv_kernel - 1)
                 + llm.mamba_num_heads // tp * llm.mamba_head_dim * llm.ssm_state_size)
    return n * per_layer * FP32_BYTES


def kv_bytes_per_token(llm: LLMConfig, kv_dtype: str, tp: int = 1, num_attention_layers: int | None = None) -> int:
    """Σ over attention layers of 2 (K and V) × kv_heads/tp × head_dim × bytes(kv cache dtype) (per GPU: each
    rank caches its own KV heads). Default: every attention layer."""
    n = llm.num_layers_of["attention"] if num_attention_layers is None else num_attention_layers
    per_layer = 2 * (llm.num_key_value_heads // tp) * llm.head_dim * PRECISION_BYTES[kv_dtype]
    return int(n * per_layer)


def activation_dtype(target: TargetConfig) -> str:
    """Compute dtype of activations: bf16 on GPU targets (fp8/nvfp4 GEMMs still take/produce bf16), else the
    LLM precision."""
    return "bf16" if target.is_gpu and target.llm_precision in ("fp8", "nvfp4") else target.llm_precision


def llm_activation_bytes(llm: LLMConfig, tokens: int, logits_rows: int, act_bytes: float, tp: int = 1,
                         kinds: set[str] | None = None) -> int:
    """Peak activations of one LLM forward pass over `tokens` tokens on one GPU (layers run one after another,
    so only the widest layer is live at once; `kinds`: the layer types this GPU runs, default all):

    tokens × act_bytes × (2·hidden + max(2·intermediate, in_proj + conv_dim + d_inner, (heads+2·kv)·hd + heads·hd)/tp)
    + ceil(tokens / chunk_size) × heads/tp × head_dim × state × 4   (chunked-scan states of one Mamba layer, fp32)
    + logits_rows × vocab × 4                                       (fp32 logits of the last token per sequence)

    With tensor parallel the residual and the layer input stay whole on every rank; the layer intermediates are
    split; the logits are gathered to the full vocabulary on every rank (lm_head gather_output). A pipeline
    stage other than the last has no logits (logits_rows 0).
    """
    present = {k for k, n in llm.num_layers_of.items() if n} if kinds is None else kinds
    widths = [0]
    if "mlp" in present:
        widths.append(2 * llm.intermediate_size)
    if "mamba" in present:
        widths.append(llm.mamba_in_proj_dim + llm.mamba_conv_dim + llm.mamba_d_inner)
    if "attention" in present:
        q = llm.num_attention_heads * llm.head_dim
        widths.append(q + 2 * llm.num_key_value_heads * llm.head_dim + q)
    per_token = 2 * llm.hidden_size + max(widths) // tp
    scan = 0
    if "mamba" in present:
        scan = (math.ceil(tokens / llm.chunk_size) * (llm.mamba_num_heads // tp) * llm.mamba_head_dim
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


class PlanError(ValueError):
    """The checkpoint cannot be laid out as asked (a tensor-parallel size that splits a head, too many stages)."""


# Layer/tensor axes TensorRT-LLM splits by the tensor-parallel size: (what, config key, layer type that has it).
_TP_AXES = (("attention heads", "num_attention_heads", "attention"),
            ("KV heads", "num_key_value_heads", "attention"),
            ("Mamba heads", "mamba_num_heads", "mamba"),
            ("Mamba groups", "n_groups", "mamba"),
            ("MLP width", "intermediate_size", "mlp"))
TP_CHOICES = tuple(2**i for i in range(MAX_WORLD_SIZE.bit_length()) if 2**i <= MAX_WORLD_SIZE)  # 1, 2, 4, 8


def check_parallel(llm: LLMConfig, parallel: ParallelOptions) -> None:
    """Refuse a layout the checkpoint cannot take, in one sentence: tp must divide every split axis (each rank
    holds whole heads / groups; upstream's KV-head duplication for tp > kv heads is refused here: it would
    cache every KV head tp/kv times), pp must not exceed the layer count (every stage needs a layer)."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    present = {k for k, n in llm.num_layers_of.items() if n}
    axes = [(what, key, getattr(llm, key)) for what, key, kind in _TP_AXES if kind in present]
    for what, key, n in axes:
        if n % tp:
            fits = [t for t in TP_CHOICES if t * pp <= MAX_WORLD_SIZE and all(m % t == 0 for *_, m in axes)]
            raise PlanError(f"tensor_parallel {tp} does not divide the checkpoint's {n} {what} ({key}): every "
                            f"rank must hold whole {what}; sizes that fit: {', '.join(map(str, fits))}.")
    if pp > llm.num_hidden_layers:
        raise PlanError(f"pipeline_parallel {pp} is more than the checkpoint's {llm.num_hidden_layers} layers: "
                        f"every stage needs at least one layer.")


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Layers of each pipeline stage, as TensorRT-LLM's Mapping.pp_layers splits them (tensor_split: when
    num_layers % pp = n ≠ 0 the first n stages get one layer more; tensorrt_llm/mapping.py@05ebebb2)."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@dataclass(frozen=True)
class StagePlan:
    """What one GPU of a pipeline stage holds (all tp ranks of a stage hold the same sizes). Bytes per GPU."""

    stage: int
    ranks: tuple[int, ...]  # global ranks: rank = stage × tp + tp_rank (TensorRT-LLM Mapping)
    layer_first: int
    layer_last: int  # inclusive
    num_layers_of: dict[str, int]  # mamba / attention / mlp layers of this stage
    has_embedding: bool
    has_lm_head: bool
    llm_weights_bytes: int
    vision_weights_bytes: int  # the vision TensorRT engine is replicated on every GPU
    weights_bytes: int
    llm_activation_bytes: int
    vision_activation_bytes: int  # × serving.vision_instances execution contexts
    activation_bytes: int
    mamba_state_bytes_per_seq: int
    kv_bytes_per_token: int
    cache_bytes_per_seq: int
    kv_mamba_budget_bytes: int  # budget − weights − activations: room for the caches
    max_batch_size: int  # sequences at max_seq_len whose caches fit on this GPU
    max_context_len: int  # longest single sequence that fits on this GPU (capped by the checkpoint)
    decode_bytes_per_step: int  # at the replica's engine batch


@dataclass(frozen=True)
class MemoryPlan:
    """The plan for one checkpoint on one target and parallel layout. Sizes in bytes; the per-GPU fields are
    those of the tightest GPU (the stage that bounds the batch; with tp = pp = 1 the only GPU)."""

    target: str
    llm_precision: str
    vision_precision: str
    kv_cache_dtype: str
    activation_dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    world_size: int  # GPUs of one replica = tp × pp
    tightest_stage: int
    gpu_memory_bytes: int  # per GPU
    memory_fraction: float
    memory_budget_bytes: int  # per GPU: gpu_memory × memory_fraction
    hbm_bandwidth_gbps: float  # per GPU
    llm_params: int  # whole model
    llm_quantized_params: int  # whole model
    vision_params: int
    llm_weights_bytes_total: int  # whole model at the LLM precision (= llm_weights_bytes when world size 1)
    llm_weights_bytes: int  # per GPU
    vision_weights_bytes: int  # per GPU
    weights_bytes: int  # per GPU: llm + vision
    mamba_state_bytes_per_seq: int  # per GPU
    kv_bytes_per_token: int  # per GPU
    max_seq_len: int  # min(target limit, checkpoint max_sequence_length)
    max_num_tokens: int
    cache_bytes_per_seq: int  # per GPU: mamba state + max_seq_len × kv_bytes_per_token
    llm_activation_bytes: int  # per GPU
    vision_max_batch_tiles: int
    vision_activation_bytes: int  # per GPU
    activation_bytes: int  # per GPU: llm + vision
    kv_mamba_budget_bytes: int  # per GPU: budget − weights − activations
    max_batch_size: int  # per replica: sequences whose caches fit at max_seq_len on every GPU (0: do not fit)
    max_batch_size_configured: int  # the target's cap
    engine_max_batch_size: int  # min(fit, cap): what the engines are built for
    cache_bytes: int  # per GPU: engine_max_batch_size × cache_bytes_per_seq
    free_bytes: int  # per GPU: budget − weights − activations − cache
    max_context_len: int  # per replica: longest single sequence that fits (capped by the checkpoint)
    max_context_len_cap: int  # the checkpoint's max_sequence_length
    decode_context_len: int  # mean context in the decode roofline: decode_context_fraction × max_seq_len
    decode_bytes_per_step: int  # most bytes one GPU reads per decode step at the engine batch
    decode_tokens_per_s_bound: float  # per replica: B × bandwidth / decode_bytes_per_step
    decode_tokens_per_s_bound_batch1: float
    peak_tflops: float | None  # per GPU, dense tensor cores at the LLM precision (None: not given)
    prefill_flops_per_token: int  # 2 × decoder Linear weights (whole model)
    prefill_tokens_per_s_bound: float | None  # per replica: world × peak / flops per token
    image_tiles: int  # tiles of the largest image (max_num_tiles + thumbnail)
    image_tokens: int  # LLM tokens of that image: tiles × tokens_per_tile + <img></img>
    video_frame_tokens: int  # LLM tokens of one sampled frame after EVS: ⌊tokens_per_tile × (1 − q)⌋ + 2
    images_per_s_bound: float | None  # per replica, largest images only
    video_frames_per_s_bound: float | None  # per replica, video frames only
    cpu_ms_per_image: float
    cpu_ms_per_video_frame: float
    preprocess_cores_images: float | None  # per replica: images/s × CPU s per image
    preprocess_cores_video: float | None  # per replica: frames/s × CPU s per frame
    stages: tuple[StagePlan, ...]

    def to_dict(self) -> dict:
        """Plain JSON types (tuples → lists), as `plan --json` prints and the manifest records."""
        return json.loads(json.dumps(asdict(self)))


def image_tokens(cfg: VLMConfig, tiles: int) -> int:
    """LLM tokens of one image of `tiles` tiles: tiles × tokens_per_tile + `<img>` + `</img>` (docs/model.md)."""
    return tiles * cfg.tokens_per_tile + 2


def video_frame_tokens(cfg: VLMConfig) -> int:
    """LLM tokens of one sampled video frame on average after EVS at the checkpoint's video_pruning_rate q:
    ⌊tokens_per_tile × (1 − q)⌋ + `<img>` + `</img>` (the "Frame i sampled at t s:" text is not counted)."""
    return int(cfg.tokens_per_tile * (1.0 - cfg.video_pruning_rate)) + 2


def plan_memory(cfg: VLMConfig, target: TargetConfig) -> MemoryPlan:
    """Compute the memory plan of `cfg` on `target` and its `parallel` layout (formulas in the module docs and
    docs/build.md). Raises `PlanError` for a layout the checkpoint cannot take."""
    llm = cfg.llm
    par = target.parallel
    check_parallel(llm, par)
    tp, pp, world = par.tensor_parallel, par.pipeline_parallel, par.world_size
    prec = target.llm_precision
    lp = llm_params(llm)
    llm_w_total = llm_weight_bytes(lp, prec)
    vparams = vision_params(cfg)
    vis_w = int(vparams * PRECISION_BYTES[target.vision_precision])

    max_seq = min(target.limits.max_seq_len, cfg.max_sequence_length)
    tokens = target.limits.max_num_tokens
    cap = target.limits.max_batch_size
    act_dt = activation_dtype(target)
    tiles = vision_max_batch_tiles(cfg, target)
    # each vision execution context on a GPU has its own activation memory; the engine's weights are shared
    vis_act = vision_activation_bytes(cfg, tiles, PRECISION_BYTES[target.vision_precision]) \
        * target.serving.vision_instances
    mem = int(target.gpu_memory_gib * GIB)
    budget = int(mem * target.memory_fraction)
    ctx = int(target.decode_context_fraction * max_seq)
    bw = target.hbm_bandwidth_gbps * 1e9

    raw = []
    for s, layers in enumerate(stage_layers(llm.num_hidden_layers, pp)):
        kinds = [llm.layer_types[i] for i in layers]
        counts = {k: kinds.count(k) for k in llm.num_layers_of}
        first, last = s == 0, s == pp - 1
        llm_w = llm_weight_bytes(llm_params(llm, tp, layers, first, last), prec)
        mamba = mamba_state_bytes_per_seq(llm, tp, counts["mamba"])
        kv = kv_bytes_per_token(llm, target.kv_cache_dtype, tp, counts["attention"])
        llm_act = llm_activation_bytes(llm, tokens, min(tokens, cap) if last else 0, PRECISION_BYTES[act_dt], tp,
                                       {k for k, n in counts.items() if n})
        per_seq = mamba + max_seq * kv
        room = budget - llm_w - vis_w - llm_act - vis_act
        fit = 0 if room < 0 else (room // per_seq if per_seq > 0 else cap)
        longest = cfg.max_sequence_length if kv == 0 else (room - mamba) // kv
        raw.append(dict(stage=s, layers=layers, counts=counts, first=first, last=last, llm_w=llm_w, mamba=mamba,
                        kv=kv, llm_act=llm_act, per_seq=per_seq, room=room, fit=int(fit),
                        longest=int(max(0, min(longest, cfg.max_sequence_length)))))
    tight = min(raw, key=lambda r: r["fit"])  # the first stage with the smallest fit bounds the replica
    fit = tight["fit"]
    engine_b = min(fit, cap)

    def step_bytes(r: dict, b: int) -> int:
        # one decode step reads this GPU's LLM weights once and each sequence's state/cache slice once
        return r["llm_w"] + b * (r["mamba"] + ctx * r["kv"])

    stages = tuple(StagePlan(
        stage=r["stage"], ranks=tuple(r["stage"] * tp + t for t in range(tp)), layer_first=r["layers"].start,
        layer_last=r["layers"].stop - 1, num_layers_of=r["counts"], has_embedding=r["first"], has_lm_head=r["last"],
        llm_weights_bytes=r["llm_w"], vision_weights_bytes=vis_w, weights_bytes=r["llm_w"] + vis_w,
        llm_activation_bytes=r["llm_act"], vision_activation_bytes=vis_act, activation_bytes=r["llm_act"] + vis_act,
        mamba_state_bytes_per_seq=r["mamba"], kv_bytes_per_token=r["kv"], cache_bytes_per_seq=r["per_seq"],
        kv_mamba_budget_bytes=r["room"], max_batch_size=r["fit"], max_context_len=r["longest"],
        decode_bytes_per_step=step_bytes(r, engine_b)) for r in raw)
    # stages overlap (upstream pipelines micro-batches): a decode step is bounded by the GPU that reads most
    step_b = max(step_bytes(r, engine_b) for r in raw)
    step_1 = max(step_bytes(r, 1) for r in raw)
    bound = engine_b * bw / step_b if engine_b > 0 else 0.0

    peak = target.peak_tflops(prec) if target.is_gpu else None
    flops_tok = 2 * lp.quantizable
    prefill = world * peak * 1e12 / flops_tok if peak else None
    img_tiles = target.limits.max_num_tiles + (1 if cfg.use_thumbnail and target.limits.max_num_tiles > 1 else 0)
    img_tok, frame_tok = image_tokens(cfg, img_tiles), video_frame_tokens(cfg)
    srv = target.serving
    images = prefill / img_tok if prefill else None
    frames = prefill / frame_tok if prefill else None
    t = tight
    return MemoryPlan(
        target=target.name, llm_precision=prec, vision_precision=target.vision_precision,
        kv_cache_dtype=target.kv_cache_dtype, activation_dtype=act_dt, tensor_parallel_size=tp,
        pipeline_parallel_size=pp, world_size=world, tightest_stage=t["stage"], gpu_memory_bytes=mem,
        memory_fraction=target.memory_fraction, memory_budget_bytes=budget,
        hbm_bandwidth_gbps=target.hbm_bandwidth_gbps, llm_params=lp.total, llm_quantized_params=lp.quantizable,
        vision_params=vparams, llm_weights_bytes_total=llm_w_total, llm_weights_bytes=t["llm_w"],
        vision_weights_bytes=vis_w, weights_bytes=t["llm_w"] + vis_w, mamba_state_bytes_per_seq=t["mamba"],
        kv_bytes_per_token=t["kv"], max_seq_len=max_seq, max_num_tokens=tokens, cache_bytes_per_seq=t["per_seq"],
        llm_activation_bytes=t["llm_act"], vision_max_batch_tiles=tiles, vision_activation_bytes=vis_act,
        activation_bytes=t["llm_act"] + vis_act, kv_mamba_budget_bytes=t["room"], max_batch_size=fit,
        max_batch_size_configured=cap, engine_max_batch_size=engine_b, cache_bytes=engine_b * t["per_seq"],
        free_bytes=t["room"] - engine_b * t["per_seq"], max_context_len=min(r["longest"] for r in raw),
        max_context_len_cap=cfg.max_sequence_length,
        decode_context_len=ctx, decode_bytes_per_step=step_b, decode_tokens_per_s_bound=round(bound, 1),
        decode_tokens_per_s_bound_batch1=round(bw / step_1, 1), peak_tflops=peak, prefill_flops_per_token=flops_tok,
        prefill_tokens_per_s_bound=round(prefill, 1) if prefill else None, image_tiles=img_tiles,
        image_tokens=img_tok, video_frame_tokens=frame_tok,
        images_per_s_bound=round(images, 2) if images else None,
        video_frames_per_s_bound=round(frames, 1) if frames else None, cpu_ms_per_image=srv.cpu_ms_per_image,
        cpu_ms_per_video_frame=srv.cpu_ms_per_video_frame,
        preprocess_cores_images=round(images * srv.cpu_ms_per_image / 1000, 2) if images else None,
        preprocess_cores_video=round(frames * srv.cpu_ms_per_video_frame / 1000, 2) if frames else None,
        stages=stages,
    )


def _gb(n: int) -> str:
    """Bytes as GB (1e9) with 2 decimals, or MB below 1 GB."""
    return f"{n / 1e9:,.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:,.2f} MB"


def _layers(st: StagePlan) -> str:
    n = st.num_layers_of
    return (f"layers {st.layer_first}-{st.layer_last} ({n['mamba']} M, {n['attention']} *, {n['mlp']} -)")


def rank_layout(p: MemoryPlan) -> list[str]:
    """One line per GPU of the replica: rank, stage, tp rank, layers, what it holds."""
    tp = p.tensor_parallel_size
    share = "" if tp == 1 else f" (1/{tp} of the vocabulary)"
    out = []
    for st in p.stages:
        held = [_layers(st)]
        if st.has_embedding:
            held.append(f"embedding{share}")
        if st.has_lm_head:
            held.append(f"lm_head{share} + norm_f")
        held.append("vision engine")
        for r in st.ranks:
            out.append(f"rank {r}: stage {st.stage}, tp rank {r - st.stage * tp}: {', '.join(held)}")
    return out


def format_plan(p: MemoryPlan) -> str:
    """Human-readable plan (what `nemovl-build plan` prints). Per-GPU numbers are the tightest GPU's."""
    per = " per GPU" if p.world_size > 1 else ""
    rows = [
        ("target", f"{p.target} (llm {p.llm_precision}, vision {p.vision_precision}, kv cache {p.kv_cache_dtype})"),
        ("parallel", f"tp {p.tensor_parallel_size} × pp {p.pipeline_parallel_size} = world size {p.world_size} "
                     + (f"(one replica); per-GPU numbers below are stage {p.tightest_stage}'s, the tightest GPU"
                        if p.world_size > 1 else "(one replica on one GPU)")),
        ("memory budget", f"{_gb(p.memory_budget_bytes)}{per} = {_gb(p.gpu_memory_bytes)} × {p.memory_fraction}"),
        ("weights_bytes", f"{_gb(p.weights_bytes)}{per} (llm {_gb(p.llm_weights_bytes)} of {_gb(p.llm_weights_bytes_total)} "
                          f"for {p.llm_params:,} params, vision {_gb(p.vision_weights_bytes)} for {p.vision_params:,} "
                          f"params{', on every GPU' if p.world_size > 1 else ''})"),
        ("activation_bytes", f"{_gb(p.activation_bytes)}{per} (llm {_gb(p.llm_activation_bytes)} at "
                             f"{p.max_num_tokens} tokens, vision {_gb(p.vision_activation_bytes)} at "
                             f"{p.vision_max_batch_tiles} tiles)"),
        ("KV + Mamba budget", f"{_gb(p.kv_mamba_budget_bytes)}{per} = budget − weights − activations"),
        ("mamba_state_bytes_per_seq", f"{p.mamba_state_bytes_per_seq:,} ({p.mamba_state_bytes_per_seq / 2**20:,.1f} MiB)"
                                      f"{per}"),
        ("kv_bytes_per_token", f"{p.kv_bytes_per_token:,}{per}"),
        ("cache per sequence", f"{_gb(p.cache_bytes_per_seq)}{per} at max_seq_len {p.max_seq_len}"),
        ("max_batch_size", f"{p.max_batch_size} fit; configured cap {p.max_batch_size_configured}; "
                           f"engines built for {p.engine_max_batch_size}"),
        ("max context", f"{p.max_context_len:,} tokens fit for one sequence (checkpoint max "
                        f"{p.max_context_len_cap:,}); engines built for max_seq_len {p.max_seq_len:,}"),
        ("free after caches", f"{_gb(p.free_bytes)}{per}"),
        ("decode_tokens_per_s_bound", f"{p.decode_tokens_per_s_bound:,.1f} tok/s at batch {p.engine_max_batch_size}, "
                                      f"context {p.decode_context_len} ({p.decode_tokens_per_s_bound_batch1:,.1f} "
                                      f"tok/s at batch 1)" + (" per replica; all-reduce not modelled"
                                                               if p.world_size > 1 else "")),
    ]
    if p.prefill_tokens_per_s_bound:
        rows += [
            ("prefill bound", f"{p.prefill_tokens_per_s_bound:,.0f} tok/s = {p.world_size} × {p.peak_tflops:g} TFLOPS "
                              f"/ {p.prefill_flops_per_token / 1e9:,.2f} GFLOP per token"),
            ("preprocessing cores", f"images: {p.images_per_s_bound:,.2f}/s ({p.image_tiles} tiles = "
                                    f"{p.image_tokens} tokens) × {p.cpu_ms_per_image:g} ms = "
                                    f"{p.preprocess_cores_images:,.2f} cores ({p.preprocess_cores_images / p.world_size:,.2f}"
                                    f" per GPU); video: {p.video_frames_per_s_bound:,.1f} frames/s "
                                    f"({p.video_frame_tokens} tokens) × {p.cpu_ms_per_video_frame:g} ms = "
                                    f"{p.preprocess_cores_video:,.2f} cores ({p.preprocess_cores_video / p.world_size:,.2f}"
                                    f" per GPU)"),
        ]
    rows += [("rank layout" if i == 0 else "", line) for i, line in enumerate(rank_layout(p))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


DEPLOY_TARGETS = ("a100", "l40s", "h100", "b200")
DEPLOY_GPUS = (1, 2, 4, 8)


def deploy_table(cfg: VLMConfig, targets: tuple[str, ...] = DEPLOY_TARGETS,
                 gpus: tuple[int, ...] = DEPLOY_GPUS) -> str:
    """Markdown table of the plan for 1, 2, 4, 8 GPUs (tensor parallel, pp 1) per target: what the
    docs/deploy.md plan-table region holds (`nemovl-build plan --table`, checked by tests)."""
    from nemovl_trt.build.targets import load_target

    head = ("| target | GPUs (tp) | weights / GPU | KV + Mamba budget / GPU | max batch per replica (fit / engines) "
            "| decode bound tok/s per replica (engine batch / batch 1) | max context (tokens: fits / engines) "
            "| preprocessing cores per replica (images / video) |")
    lines = [head, "|" + "---|" * 8]
    for name in targets:
        base = load_target(name)
        for n in gpus:
            p = plan_memory(cfg, base.with_parallel(tensor_parallel=n, pipeline_parallel=1))
            cores = (f"{p.preprocess_cores_images:,.1f} / {p.preprocess_cores_video:,.1f}"
                     if p.preprocess_cores_images is not None else "n/a")
            lines.append(f"| {name} ({p.llm_precision}) | {n} | {p.weights_bytes / 1e9:,.2f} GB "
                         f"| {p.kv_mamba_budget_bytes / 1e9:,.2f} GB | {p.max_batch_size} / {p.engine_max_batch_size} "
                         f"| {p.decode_tokens_per_s_bound:,.0f} / {p.decode_tokens_per_s_bound_batch1:,.0f} "
                         f"| {p.max_context_len:,} / {p.max_seq_len:,} | {cores} |")
    legend = [
        "",
        f"Generated by `nemovl-build plan --table` (`nemovl_trt.build.plan.deploy_table`) from the checkpoint's "
        f"config.json ({cfg.llm.num_hidden_layers} layers, {cfg.llm.num_key_value_heads} KV heads, "
        f"{cfg.llm.mamba_num_heads} Mamba heads, {cfg.llm.n_groups} groups); tensor parallel, pipeline parallel 1, "
        f"each target's own precisions and limits (max_seq_len, batch cap). Per GPU: what each GPU of the replica "
        f"holds (the LLM split by tp, the vision engine whole on every GPU). Max batch: sequences at max_seq_len "
        f"whose KV cache + Mamba state fit on the tightest GPU / what the engines are built for (capped by the "
        f"target). Decode bound: engine batch × HBM bandwidth / bytes one GPU reads per step, at a mean context of "
        f"decode_context_fraction × max_seq_len; the all-reduce is not modelled. Max context: longest single "
        f"sequence that fits, capped by the checkpoint's max_sequence_length ({cfg.max_sequence_length:,}) / the "
        f"target's max_seq_len the engines are built for. "
        f"Preprocessing cores: images/s (or video frames/s) the prefill roofline absorbs × host CPU seconds per "
        f"image (or frame) from the target's `serving:` section. Formulas: docs/build.md \"Multi-GPU plan\".",
    ]
    return "\n".join(lines + legend) + "\n"
