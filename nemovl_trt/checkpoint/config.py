"""Typed, frozen views of a `NemotronH_Nano_VL_V2` checkpoint's `config.json`.

Every size, token id, pattern and normalization constant the rest of the project uses comes from
these objects, which are parsed from the checkpoint's files — never from constants in code.
Errors are `CheckpointError` with one sentence naming the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "NemotronH_Nano_VL_V2"
WEIGHTS_FILE = "model.safetensors"  # single-file weights
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights: {"weight_map": {tensor: shard file}}
LAYER_TYPES = {"M": "mamba", "*": "attention", "-": "mlp"}

# ViT sizes by timm model name, as the public RADIO loaders look them up (docs/model.md §1.3). A checkpoint
# may also carry explicit `hidden_size`/`num_hidden_layers`/`num_attention_heads`/`intermediate_size`
# keys in `vision_config` (the tiny checkpoints do); explicit keys win.
VIT_DIMS_BY_NAME: dict[str, dict[str, int]] = {
    "vit_huge_patch16_224": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                             "intermediate_size": 5120},
    "vit_large_patch16_224": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                              "intermediate_size": 4096},
    "vit_base_patch16_224": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                             "intermediate_size": 3072},
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or inconsistent. The message names the file/tensor."""


def _req(d: dict[str, Any], key: str, where: str, typ: type | tuple[type, ...] | None = None) -> Any:
    if key not in d:
        raise CheckpointError(f"{where} is missing the key '{key}'.")
    value = d[key]
    if typ is not None and not isinstance(value, typ):
        raise CheckpointError(f"{where} key '{key}' has type {type(value).__name__}, expected {typ}.")
    return value


@dataclass(frozen=True)
class LLMConfig:
    """Nemotron-H hybrid LLM sizes (`config.json` → `llm_config`)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    hybrid_override_pattern: str  # one char per layer: M mamba2, * attention, - mlp
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    layer_norm_epsilon: float
    use_conv_bias: bool
    mamba_proj_bias: bool
    mlp_bias: bool
    attention_bias: bool
    mlp_hidden_act: str
    mamba_hidden_act: str
    time_step_limit: tuple[float, float]
    max_position_embeddings: int
    tie_word_embeddings: bool
    residual_in_fp32: bool
    mamba_ssm_cache_dtype: str
    torch_dtype: str

    # --- derived sizes (no new facts, only arithmetic on the fields above) ---
    @property
    def layer_types(self) -> list[str]:
        return [LAYER_TYPES[c] for c in self.hybrid_override_pattern]

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the depthwise conv: x + B + C."""
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        """in_proj output: z (d_inner) + xBC (conv_dim) + dt (heads)."""
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads

    @property
    def num_layers_of(self) -> dict[str, int]:
        return {t: self.layer_types.count(t) for t in LAYER_TYPES.values()}


@dataclass(frozen=True)
class VisionConfig:
    """RADIO ViT (`config.json` → `vision_config`)."""

    model_name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    cpe_max_size: int  # pixels; the learned position grid is (cpe_max_size/patch)^2
    layer_norm_eps: float
    num_cls_tokens: int
    num_registers: int
    qkv_bias: bool
    pos_embed_align_corners: bool  # CPE resample alignment (docs/model.md §4.3); our reference uses False

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    @property
    def pos_grid(self) -> int:
        return self.cpe_max_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VLMConfig:
    """The whole `NemotronH_Nano_VL_V2` model: top-level keys + the two sub-configs."""

    force_image_size: int
    patch_size: int
    downsample_ratio: float
    ps_version: str
    image_tag_type: str
    projector_hidden_size: int
    vit_hidden_size: int
    use_thumbnail: bool
    norm_mean: tuple[float, float, float]
    norm_std: tuple[float, float, float]
    img_context_token: str
    img_start_token: str
    img_end_token: str
    video_context_token: str
    img_context_token_id: int
    video_context_token_id: int | None
    video_pruning_rate: float
    max_sequence_length: int
    torch_dtype: str
    llm: LLMConfig
    vision: VisionConfig
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def patches_per_side(self) -> int:
        """ViT patch grid side for one tile, e.g. 512/16 = 32."""
        return self.force_image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        """Token grid side after pixel shuffle, e.g. 32·0.5 = 16."""
        return int(round(self.patches_per_side * self.downsample_ratio))

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one 512×512 tile becomes (256 for the 12B and the tiny checkpoints)."""
        return self.tokens_per_side**2

    @property
    def shuffled_dim(self) -> int:
        """Channel width after pixel shuffle: vit_hidden / ratio² (1280·4 = 5120)."""
        return int(round(self.vit_hidden_size / (self.downsample_ratio**2)))


def _float_triplet(v: Any, where: str) -> tuple[float, float, float]:
    if not (isinstance(v, list | tuple) and len(v) == 3 and all(isinstance(x, int | float) for x in v)):
        raise CheckpointError(f"{where} must be a list of 3 numbers, got {v!r}.")
    return (float(v[0]), float(v[1]), float(v[2]))


def parse_llm_config(d: dict[str, Any], where: str = "config.json llm_config") -> LLMConfig:
    pattern = _req(d, "hybrid_override_pattern", where, str)
    bad = sorted(set(pattern) - set(LAYER_TYPES))
    if bad:
        raise CheckpointError(f"{where} hybrid_override_pattern has unsupported layer types {bad} "
                              f"(supported: M, *, -).")
    n_layers = _req(d, "num_hidden_layers", where, int)
    if len(pattern) != n_layers:
        raise CheckpointError(f"{where} hybrid_override_pattern has {len(pattern)} layers but "
                              f"num_hidden_layers is {n_layers}.")
    hidden = _req(d, "hidden_size", where, int)
    heads = _req(d, "num_attention_heads", where, int)
    tsl = d.get("time_step_limit", [0.0, math.inf])
    tsl = (float(tsl[0]), float(tsl[1])) if tsl is not None else (0.0, math.inf)
    return LLMConfig(
        vocab_size=_req(d, "vocab_size", where, int),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        hybrid_override_pattern=pattern,
        intermediate_size=_req(d, "intermediate_size", where, int),
        num_attention_heads=heads,
        num_key_value_heads=_req(d, "num_key_value_heads", where, int),
        head_dim=int(d.get("head_dim") or hidden // heads),
        mamba_num_heads=_req(d, "mamba_num_heads", where, int),
        mamba_head_dim=_req(d, "mamba_head_dim", where, int),
        ssm_state_size=_req(d, "ssm_state_size", where, int),
        n_groups=_req(d, "n_groups", where, int),
        conv_kernel=int(d.get("conv_kernel", 4)),
        chunk_size=int(d.get("chunk_size", 128)),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", d.get("rms_norm_eps", 1e-5))),
        use_conv_bias=bool(d.get("use_conv_bias", True)),
        mamba_proj_bias=bool(d.get("mamba_proj_bias", d.get("use_bias", False))),
        mlp_bias=bool(d.get("mlp_bias", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_hidden_act=str(d.get("mlp_hidden_act", "relu2")),
        mamba_hidden_act=str(d.get("mamba_hidden_act", "silu")),
        time_step_limit=tsl,
        max_position_embeddings=int(d.get("max_position_embeddings", 0)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        residual_in_fp32=bool(d.get("residual_in_fp32", False)),
        mamba_ssm_cache_dtype=str(d.get("mamba_ssm_cache_dtype", "float32")),
        torch_dtype=str(d.get("torch_dtype", "bfloat16")),
    )


def parse_vision_config(d: dict[str, Any], where: str = "config.json vision_config") -> VisionConfig:
    args = d.get("args") or {}
    name = str(args.get("model", d.get("model", "")))
    dims = dict(VIT_DIMS_BY_NAME.get(name, {}))
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if k in d:
            dims[k] = int(d[k])
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if k not in dims]
    if missing:
        raise CheckpointError(f"{where} names ViT '{name}', which has no known sizes, and lacks the keys "
                              f"{missing}.")
    # Prefix tokens: one CLS per unique teacher when cls_token_per_teacher, else 1; then registers pad the
    # prefix to a multiple of register_multiple (RADIO's rule). The loader cross-checks this against the
    # shape of `cls_token.token`, which is the ground truth.
    teachers = args.get("teachers") or []
    if args.get("cls_token_per_teacher", False) and teachers:
        num_cls = len({t.get("name", str(i)) if isinstance(t, dict) else str(t) for i, t in enumerate(teachers)})
    else:
        num_cls = int(args.get("num_cls_tokens", 1))
    reg_mult = args.get("register_multiple")
    num_reg = int(args["num_registers"]) if "num_registers" in args else (
        (reg_mult - num_cls % reg_mult) % reg_mult if reg_mult else 0)
    return VisionConfig(
        model_name=name,
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        intermediate_size=dims["intermediate_size"],
        patch_size=int(d.get("patch_size", args.get("patch_size", 16))),
        cpe_max_size=int(args.get("cpe_max_size", d.get("max_resolution", 2048))),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        num_cls_tokens=num_cls,
        num_registers=num_reg,
        qkv_bias=bool(d.get("qkv_bias", True)),
        pos_embed_align_corners=bool(d.get("pos_embed_align_corners", False)),
    )


def parse_vlm_config(d: dict[str, Any], preprocessor: dict[str, Any] | None = None,
                     where: str = "config.json") -> VLMConfig:
    """Parse the top-level config (and `preprocessor_config.json` when present; its
    image_mean/image_std win over config.json's norm_mean/norm_std, as docs/model.md §0 says)."""
    archs = d.get("architectures") or []
    if ARCHITECTURE not in archs and d.get("model_type") != ARCHITECTURE:
        raise CheckpointError(f"{where} declares architecture {archs or d.get('model_type')!r}; "
                              f"only {ARCHITECTURE} is supported.")
    llm = parse_llm_config(_req(d, "llm_config", where, dict), f"{where} llm_config")
    vision = parse_vision_config(_req(d, "vision_config", where, dict), f"{where} vision_config")
    pre = preprocessor or {}
    mean = pre.get("image_mean", d.get("norm_mean"))
    std = pre.get("image_std", d.get("norm_std"))
    if mean is None or std is None:
        raise CheckpointError(f"{where} has no norm_mean/norm_std and preprocessor_config.json has no "
                              f"image_mean/image_std.")
    vid_id = d.get("video_context_token_id")
    return VLMConfig(
        force_image_size=int(_req(d, "force_image_size", where, int)),
        patch_size=int(_req(d, "patch_size", where, int)),
        downsample_ratio=float(_req(d, "downsample_ratio", where, (int, float))),
        ps_version=str(d.get("ps_version", "v2")),
        image_tag_type=str(d.get("image_tag_type", "internvl")),
        projector_hidden_size=int(_req(d, "projector_hidden_size", where, int)),
        vit_hidden_size=int(d.get("vit_hidden_size", vision.hidden_size)),
        use_thumbnail=bool(d.get("use_thumbnail", True)),
        norm_mean=_float_triplet(mean, f"{where} norm_mean"),
        norm_std=_float_triplet(std, f"{where} norm_std"),
        img_context_token=str(d.get("img_context_token", "<image>")),
        img_start_token=str(d.get("img_start_token", "<img>")),
        img_end_token=str(d.get("img_end_token", "</img>")),
        video_context_token=str(d.get("video_context_token", "<video>")),
        img_context_token_id=int(_req(d, "img_context_token_id", where, int)),
        video_context_token_id=int(vid_id) if vid_id is not None else None,
        video_pruning_rate=float(d.get("video_pruning_rate", 0.0)),
        max_sequence_length=int(d.get("max_sequence_length", llm.max_position_embeddings)),
        torch_dtype=str(d.get("torch_dtype", "bfloat16")),
        llm=llm,
        vision=vision,
        raw=d,
    )


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, raising CheckpointError naming the file on any problem."""
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {path.parent}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return data


def load_vlm_config(ckpt_dir: str | Path) -> VLMConfig:
    """Load `config.json` (+ optional `preprocessor_config.json`) from a checkpoint directory."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist.")
    pre_path = ckpt / "preprocessor_config.json"
    pre = read_json(pre_path) if pre_path.is_file() else None
    return parse_vlm_config(read_json(ckpt / "config.json"), pre, where=str(ckpt / "config.json"))
