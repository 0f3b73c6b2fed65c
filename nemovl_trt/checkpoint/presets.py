"""Config presets for `nemovl-build make-checkpoint --preset NAME`.

`12b-config` is the real Nemotron Nano 12B v2 VL config (docs/model.md §1) for planning without
weights. `tiny` keeps every *format* fact of the real model (tensor names, config keys, 512-pixel
tiles, patch 16, downsample 0.5 → 256 tokens per tile, M/*/- layers, cls + register prefix tokens,
a CPE grid larger than one tile) with small widths and other token ids, so nothing can be hard-coded.
Token ids (`img_context_token_id`, `video_context_token_id`, vocab_size) are filled in by the
checkpoint writer from the tokenizer it trains.
"""

from __future__ import annotations

import copy
from typing import Any

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_12B_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"

_COMMON_TOP: dict[str, Any] = {
    "architectures": ["NemotronH_Nano_VL_V2"],
    "model_type": "NemotronH_Nano_VL_V2",
    "force_image_size": 512,
    "patch_size": 16,
    "downsample_ratio": 0.5,
    "ps_version": "v2",
    "image_tag_type": "internvl",
    "template": "nemotron-h-5p5-reasoning",
    "use_thumbnail": True,
    "norm_mean": CLIP_MEAN,
    "norm_std": CLIP_STD,
    "img_context_token": "<image>",
    "img_start_token": "<img>",
    "img_end_token": "</img>",
    "video_context_token": "<video>",
    "video_pruning_rate": 0.7,
    "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    "12b-config": {
        **_COMMON_TOP,
        "projector_hidden_size": 20480,
        "vit_hidden_size": 1280,
        "img_context_token_id": 131072,
        "video_context_token_id": 131075,  # [U] docs/model.md §1.1: value not published; a config field
        "max_sequence_length": 131072,
        "llm_config": {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "vocab_size": 131200,  # [U] docs/model.md §1.2: > 131074; read from the real config when present
            "hidden_size": 5120,
            "num_hidden_layers": 62,
            "hybrid_override_pattern": _12B_PATTERN,
            "intermediate_size": 20480,
            "num_attention_heads": 40,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "mamba_num_heads": 128,
            "mamba_head_dim": 80,
            "ssm_state_size": 128,
            "n_groups": 8,
            "conv_kernel": 4,
            "chunk_size": 128,
            "expand": 2,
            "mamba_hidden_act": "silu",
            "mlp_hidden_act": "relu2",
            "use_conv_bias": True,
            "mamba_proj_bias": False,
            "mlp_bias": False,
            "attention_bias": False,
            "layer_norm_epsilon": 1e-5,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
            "residual_in_fp32": False,
            "time_step_limit": [0.0, float("inf")],
            "time_step_min": 0.001,
            "time_step_max": 0.1,
            "time_step_floor": 1e-4,
            "mamba_ssm_cache_dtype": "float32",
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 12,
            "pad_token_id": 0,
        },
        "vision_config": {
            "architectures": ["RADIOModel"],
            "model_type": "radio",
            "args": {
                "model": "vit_huge_patch16_224",
                "cpe_max_size": 2048,
                "register_multiple": 8,
                "cls_token_per_teacher": True,
                "teachers": [{"name": "dfn_clip"}, {"name": "siglip"}, {"name": "dino_v2"}, {"name": "sam"}],
                "model_norm": False,
            },
            "patch_size": 16,
            "max_resolution": 2048,
            "preferred_resolution": [512, 512],
            "adaptor_names": None,
            "feature_normalizer_config": None,
            "inter_feature_normalizer_config": None,
            "vitdet_window_size": None,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "pos_embed_align_corners": False,
            "torch_dtype": "bfloat16",
        },
    },
    "tiny": {
        **_COMMON_TOP,
        "torch_dtype": "float32",
        "projector_hidden_size": 384,
        "vit_hidden_size": 64,
        "max_sequence_length": 8192,
        "llm_config": {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "hidden_size": 128,
            "num_hidden_layers": 8,
            "hybrid_override_pattern": "M-M*-M*-",
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "mamba_num_heads": 8,
            "mamba_head_dim": 16,
            "ssm_state_size": 16,
            "n_groups": 2,
            "conv_kernel": 4,
            "chunk_size": 16,
            "expand": 1,
            "mamba_hidden_act": "silu",
            "mlp_hidden_act": "relu2",
            "use_conv_bias": True,
            "mamba_proj_bias": False,
            "mlp_bias": False,
            "attention_bias": False,
            "layer_norm_epsilon": 1e-5,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "residual_in_fp32": False,
            "time_step_limit": [0.0, float("inf")],
            "time_step_min": 0.001,
            "time_step_max": 0.1,
            "time_step_floor": 1e-4,
            "mamba_ssm_cache_dtype": "float32",
            "torch_dtype": "float32",
        },
        "vision_config": {
            "architectures": ["RADIOModel"],
            "model_type": "radio",
            "args": {
                "model": "vit_tiny_custom",
                "cpe_max_size": 1024,
                "register_multiple": 4,
                "cls_token_per_teacher": True,
                "teachers": [{"name": "teacher_a"}, {"name": "teacher_b"}],
                "model_norm": False,
            },
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "patch_size": 16,
            "max_resolution": 1024,
            "preferred_resolution": [512, 512],
            "adaptor_names": None,
            "feature_normalizer_config": None,
            "inter_feature_normalizer_config": None,
            "vitdet_window_size": None,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "pos_embed_align_corners": False,
            "torch_dtype": "float32",
        },
    },
}


def preset_config(name: str) -> dict[str, Any]:
    """A deep copy of a preset's config.json dict (token ids of `tiny` are filled in by the writer)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}' (choose from {', '.join(sorted(PRESETS))})")
    return copy.deepcopy(PRESETS[name])


# generation_config.json of the config-only presets (the tiny writer derives its ids from its tokenizer).
# 12B: stop on <SPECIAL_12> (id 12, the training --eos-id) and </s> (id 2); docs/model.md §5.4.
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    "12b-config": {"bos_token_id": 1, "eos_token_id": [12, 2], "pad_token_id": 0},
}


def preset_generation_config(name: str) -> dict[str, Any]:
    """A deep copy of a config-only preset's generation_config.json dict."""
    if name not in GENERATION_PRESETS:
        raise KeyError(f"preset '{name}' has no fixed generation config (its ids come from its tokenizer)")
    return copy.deepcopy(GENERATION_PRESETS[name])
