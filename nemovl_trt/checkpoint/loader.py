"""Load a `NemotronH_Nano_VL_V2` checkpoint directory: config, tokenizer, generation config and the
safetensors weights (single `model.safetensors` or shards listed by `model.safetensors.index.json`),
validated against the tensor list of docs/model.md §4.11/§6.5. Every problem is a `CheckpointError` with one sentence
naming the file or tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nemovl_trt.checkpoint.config import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    CheckpointError,
    VLMConfig,
    load_vlm_config,
    read_json,
)
from nemovl_trt.checkpoint.tokenizer import GENERATION_CONFIG_FILE, TokenizerBundle, load_tokenizer
from nemovl_trt.checkpoint.weights import (
    CLS_TOKEN,
    EMBEDDINGS,
    expected_tensors,
    extra_allowed_tensors,
    integer_tensors,
    optional_tensors,
)

SINGLE_FILE = WEIGHTS_FILE
INDEX_FILE = WEIGHTS_INDEX_FILE
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES_BY_NAME = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class GenerationConfig:
    """`generation_config.json`: stop ids and the checkpoint's sampling defaults (None = not set)."""

    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _opt(d: dict[str, Any], key: str, typ: type) -> Any:
    v = d.get(key)
    return None if v is None else typ(v)


def parse_generation_config(d: dict[str, Any], where: str = GENERATION_CONFIG_FILE) -> GenerationConfig:
    """Parse a generation_config.json dict; `eos_token_id` may be an int or a list of ints."""
    eos = d.get("eos_token_id")
    if isinstance(eos, int) and not isinstance(eos, bool):
        eos_ids: tuple[int, ...] = (eos,)
    elif isinstance(eos, list) and eos and all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        eos_ids = tuple(eos)
    else:
        raise CheckpointError(f"{where} eos_token_id must be an integer or a non-empty list of integers, "
                              f"got {eos!r}.")
    return GenerationConfig(
        eos_token_ids=eos_ids,
        bos_token_id=_opt(d, "bos_token_id", int),
        pad_token_id=_opt(d, "pad_token_id", int),
        do_sample=_opt(d, "do_sample", bool),
        temperature=_opt(d, "temperature", float),
        top_p=_opt(d, "top_p", float),
        top_k=_opt(d, "top_k", int),
        max_new_tokens=_opt(d, "max_new_tokens", int),
        raw=d,
    )


def load_generation_config(ckpt_dir: str | Path, tokenizer: TokenizerBundle | None = None) -> GenerationConfig:
    """generation_config.json of a checkpoint; when the file is absent, the tokenizer's eos ids."""
    path = Path(ckpt_dir) / GENERATION_CONFIG_FILE
    if path.is_file():
        return parse_generation_config(read_json(path), str(path))
    if tokenizer is None or not tokenizer.eos_ids:
        raise CheckpointError(f"{GENERATION_CONFIG_FILE} is missing from {ckpt_dir} and the tokenizer names "
                              f"no eos_token.")
    return GenerationConfig(eos_token_ids=tokenizer.eos_ids, bos_token_id=tokenizer.bos_id)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint. `tensors` are eager CPU tensors keyed by their checkpoint names."""

    path: Path
    config: VLMConfig
    tokenizer: TokenizerBundle
    generation: GenerationConfig
    tensors: dict[str, torch.Tensor] = field(repr=False, compare=False)


# ---- safetensors ---------------------------------------------------------------------------------------
def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError for bad files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from None


def weight_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """Map tensor name → the safetensors file holding it (from the index, or the single file)."""
    ckpt = Path(ckpt_dir)
    single, index = ckpt / SINGLE_FILE, ckpt / INDEX_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except Exception as e:  # SafetensorError is not a stable import path
            raise CheckpointError(f"{single} is not a readable safetensors file ({e}).") from None
    if not index.is_file():
        raise CheckpointError(f"{ckpt} has neither {SINGLE_FILE} nor {INDEX_FILE}.")
    data = read_json(index)
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to shard files.")
    out: dict[str, Path] = {}
    for name, shard in wmap.items():
        shard_path = ckpt / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise CheckpointError(f"{index} maps tensor '{name}' to shard '{shard}', which does not exist in "
                                  f"{ckpt}.")
        out[name] = shard_path
    return out


def load_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (eager, CPU, stored dtypes), from `model.safetensors` or from the shards
    named by `model.safetensors.index.json`. Every shard must hold exactly the tensors the index maps to it."""
    ckpt = Path(ckpt_dir)
    files = weight_files(ckpt)
    by_file: dict[Path, set[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, set()).add(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        tensors = _read_file(path)
        missing = sorted(names - set(tensors))
        if missing:
            raise CheckpointError(f"{ckpt / INDEX_FILE} maps tensor '{missing[0]}' to {path.name}, but that "
                                  f"shard does not contain it.")
        extra = sorted(set(tensors) - names)
        if extra:
            raise CheckpointError(f"{path.name} contains tensor '{extra[0]}', which {INDEX_FILE} does not "
                                  f"list.")
        out.update(tensors)
    return out


# ---- validation ----------------------------------------------------------------------------------------
def _quantized(cfg: VLMConfig) -> bool:
    return bool(cfg.raw.get("quantization_config") or cfg.raw.get("llm_config", {}).get("quantization_config"))


def validate_tensors(cfg: VLMConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Check names, shapes and dtypes against `expected_tensors(cfg)`; `where` names the weights file(s)."""
    expected = expected_tensors(cfg)
    allowed_extra = extra_allowed_tensors(cfg)
    optional = optional_tensors(cfg)
    ints = integer_tensors(cfg)
    # The two cross-checks with a more specific message than "wrong shape".
    cls = tensors.get(CLS_TOKEN)
    if cls is not None and cls.dim() == 2 and cls.shape[0] != cfg.vision.num_prefix_tokens:
        raise CheckpointError(
            f"{where}: tensor '{CLS_TOKEN}' has {cls.shape[0]} prefix-token rows but config.json vision_config "
            f"implies {cfg.vision.num_cls_tokens} CLS + {cfg.vision.num_registers} register tokens = "
            f"{cfg.vision.num_prefix_tokens}.")
    emb = tensors.get(EMBEDDINGS)
    if emb is not None and emb.dim() == 2 and emb.shape[0] != cfg.llm.vocab_size:
        raise CheckpointError(f"{where}: tensor '{EMBEDDINGS}' has {emb.shape[0]} rows but config.json "
                              f"llm_config.vocab_size is {cfg.llm.vocab_size}.")
    for name, shape in expected.items():
        if name not in tensors and name not in optional:
            raise CheckpointError(f"{where} is missing tensor '{name}' (expected shape {list(shape)}).")
    for name, t in tensors.items():
        shape = expected.get(name, allowed_extra.get(name))
        if shape is None:
            raise CheckpointError(f"{where} has unexpected tensor '{name}' (shape {list(t.shape)}), which is "
                                  f"not part of a NemotronH_Nano_VL_V2 with this config.json.")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}.")
        if name in ints:
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise CheckpointError(f"{where}: tensor '{name}' has dtype {t.dtype}, expected an integer "
                                      f"dtype (int64).")
        elif t.dtype not in FLOAT_DTYPES:
            if t.dtype.is_floating_point and t.dtype.itemsize == 1 and not _quantized(cfg):
                raise CheckpointError(f"{where}: tensor '{name}' has dtype {t.dtype} but config.json declares "
                                      f"no quantization_config.")
            raise CheckpointError(f"{where}: tensor '{name}' has dtype {t.dtype}, expected a floating-point "
                                  f"dtype (float32, bfloat16 or float16).")


def check_tokenizer(cfg: VLMConfig, tok: TokenizerBundle, ckpt: Path) -> None:
    """Cross-check config.json's token ids and vocab size against the tokenizer files."""
    cfg_path = ckpt / "config.json"
    for token, tid, key in ((cfg.img_context_token, cfg.img_context_token_id, "img_context_token_id"),
                            (cfg.video_context_token, cfg.video_context_token_id, "video_context_token_id")):
        actual = tok.tokenizer.token_to_id(token)
        if tid is None or (actual is None and key == "video_context_token_id"):
            continue  # <video> may be a multi-token string (docs/model.md §5.1)
        if actual != tid:
            raise CheckpointError(f"{cfg_path} {key} is {tid} but the tokenizer maps '{token}' to {actual}.")
    for token in (cfg.img_start_token, cfg.img_end_token):
        if tok.tokenizer.token_to_id(token) is None:
            raise CheckpointError(f"{ckpt / 'tokenizer.json'} has no single token '{token}' (config.json "
                                  f"img_start_token / img_end_token).")
    if tok.vocab_size > cfg.llm.vocab_size:
        raise CheckpointError(f"{cfg_path} llm_config.vocab_size is {cfg.llm.vocab_size} but the tokenizer "
                              f"has {tok.vocab_size} ids.")


def _to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES_BY_NAME:
        raise CheckpointError(f"unsupported dtype '{dtype}' (choose from {', '.join(DTYPES_BY_NAME)}).")
    return DTYPES_BY_NAME[dtype]


def load_checkpoint(ckpt_dir: str | Path, dtype: str | torch.dtype | None = None) -> Checkpoint:
    """Load and validate a checkpoint directory. `dtype` (e.g. "float32", torch.bfloat16) casts the
    floating-point tensors after validation; integer buffers keep their dtype."""
    ckpt = Path(ckpt_dir)
    target = _to_dtype(dtype)
    cfg = load_vlm_config(ckpt)
    if _quantized(cfg):
        raise CheckpointError(f"{ckpt / 'config.json'} declares a quantization_config; load the BF16 "
                              f"checkpoint (the build quantizes per target).")
    tok = load_tokenizer(ckpt)
    check_tokenizer(cfg, tok, ckpt)
    gen = load_generation_config(ckpt, tok)
    tensors = load_tensors(ckpt)
    where = str(ckpt / (SINGLE_FILE if (ckpt / SINGLE_FILE).is_file() else INDEX_FILE))
    validate_tensors(cfg, tensors, where)
    if target is not None:
        tensors = {k: (v.to(target) if v.dtype.is_floating_point else v) for k, v in tensors.items()}
    return Checkpoint(path=ckpt, config=cfg, tokenizer=tok, generation=gen, tensors=tensors)


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """A small JSON-able summary (for CLIs and logs)."""
    n_params = sum(t.numel() for t in ckpt.tensors.values())
    return {"path": str(ckpt.path), "tensors": len(ckpt.tensors), "parameters": n_params,
            "vocab_size": ckpt.config.llm.vocab_size, "pattern": ckpt.config.llm.hybrid_override_pattern,
            "eos_token_ids": list(ckpt.generation.eos_token_ids)}


__all__ = ["Checkpoint", "GenerationConfig", "load_checkpoint", "load_tensors", "load_generation_config",
           "parse_generation_config", "validate_tensors", "weight_files"]
