"""Write checkpoints in the exact `NemotronH_Nano_VL_V2` Hugging Face format: `tiny` (random weights, a
locally trained tokenizer) or `12b-config` (the real config files only, for planning).

Deterministic: the same preset and seed give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from nemovl_trt.checkpoint.config import WEIGHTS_FILE as SINGLE_FILE
from nemovl_trt.checkpoint.config import WEIGHTS_INDEX_FILE as INDEX_FILE
from nemovl_trt.checkpoint.config import CheckpointError, VLMConfig, parse_vlm_config
from nemovl_trt.checkpoint.presets import preset_config, preset_generation_config
from nemovl_trt.checkpoint.tokenizer import (
    BOS,
    CHAT_TEMPLATE_FILE,
    EOS,
    GENERATION_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TURN_END,
    UNK,
    train_tiny_tokenizer,
    write_tokenizer_files,
)

if TYPE_CHECKING:  # torch is imported only when weights are written (12b-config needs none)
    import torch

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
CONFIG_ONLY_PRESETS = {"12b-config"}  # no weights and no tokenizer: sizes for `nemovl-build plan`
DEFAULT_MAX_NUM_TILES = 12  # docs/model.md §2.9: the model's default tile budget (preprocessor_config.json max_num_tiles)
_OWN_FILES = (CONFIG_FILE, PREPROCESSOR_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
              SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE, SINGLE_FILE, INDEX_FILE)


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What `write_checkpoint` wrote."""

    path: Path
    files: tuple[str, ...]
    total_bytes: int
    num_parameters: int  # 0 for config-only presets


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def preprocessor_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json: normalization and tiling keys (docs/model.md §0, §2.9), from a config.json dict."""
    return {
        "image_processor_type": "NemotronNanoVLV2ImageProcessor",
        "processor_class": "NemotronNanoVLV2Processor",
        "image_mean": cfg["norm_mean"],
        "image_std": cfg["norm_std"],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_size": cfg["force_image_size"],
        "patch_size": cfg["patch_size"],
        "downsample_ratio": cfg["downsample_ratio"],
        "min_num_tiles": 1,
        "max_num_tiles": DEFAULT_MAX_NUM_TILES,
        "use_thumbnail": cfg["use_thumbnail"],
    }


def shard_plan(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[list[str]]:
    """Split tensor names (in order) into shards of at most `shard_bytes` each (a larger tensor gets a shard
    of its own), as HF's `save_pretrained(max_shard_size=...)` does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_tensors(out_dir: Path, tensors: dict[str, torch.Tensor], shard_bytes: int | None = None) -> list[str]:
    """Write `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
    when `shard_bytes` is given and the tensors do not fit in one shard. Returns the file names written."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    plan = shard_plan(tensors, shard_bytes) if shard_bytes else [list(tensors)]
    if len(plan) == 1:
        save_file(tensors, str(out_dir / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names: list[str] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(plan, start=1):
        fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(out_dir / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
        names.append(fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _dump(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return [*names, INDEX_FILE]


def _prepare_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"{out} exists and is not empty; choose another --out or pass --force.")
        # Remove only files a previous checkpoint write could have left (stale shards included).
        for p in out.iterdir():
            if p.is_file() and (p.name in _OWN_FILES or (p.name.startswith("model-") and p.suffix == ".safetensors")):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _fill_token_ids(cfg: dict[str, Any], added: dict[str, int], vocab_size: int) -> None:
    """Write the trained tokenizer's ids into a config.json dict (top level and llm_config)."""
    cfg["img_context_token_id"] = added[cfg["img_context_token"]]
    cfg["video_context_token_id"] = added.get(cfg["video_context_token"])
    llm = cfg["llm_config"]
    llm["vocab_size"] = vocab_size
    llm["bos_token_id"] = added[BOS]
    llm["eos_token_id"] = added[TURN_END]
    llm["pad_token_id"] = added[UNK]


def write_checkpoint(out_dir: str | Path, preset: str, seed: int = 0, shard_bytes: int | None = None,
                     force: bool = False) -> WrittenCheckpoint:
    """Write a checkpoint of `preset` ("tiny" | "12b-config") into `out_dir` (created; must be empty unless
    `force`). `tiny`: config.json (token ids and vocab_size from the trained tokenizer),
    preprocessor_config.json, generation_config.json (eos = [<SPECIAL_12>, </s>]), tokenizer files and
    safetensors weights (sharded when `shard_bytes` is given). `12b-config`: the three JSON configs only."""
    out = Path(out_dir)
    try:
        cfg = preset_config(preset)
    except KeyError as e:
        raise CheckpointError(str(e.args[0])) from None
    if shard_bytes is not None and shard_bytes <= 0:
        raise CheckpointError(f"shard size must be a positive number of bytes, got {shard_bytes}.")
    _prepare_dir(out, force)
    files: list[str] = []
    n_params = 0
    if preset in CONFIG_ONLY_PRESETS:
        gen = preset_generation_config(preset)
    else:
        tok_json, tok_config = train_tiny_tokenizer(seed, model_max_length=cfg["max_sequence_length"])
        added = {v["content"]: int(k) for k, v in tok_config["added_tokens_decoder"].items()}
        vocab = Tokenizer.from_str(json.dumps(tok_json)).get_vocab_size(with_added_tokens=True)
        _fill_token_ids(cfg, added, vocab)
        write_tokenizer_files(out, tok_json, tok_config)
        files += [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE]
        gen = {"bos_token_id": added[BOS], "eos_token_id": [added[TURN_END], added[EOS]],
               "pad_token_id": added[UNK]}
    _dump(out / CONFIG_FILE, cfg)
    _dump(out / PREPROCESSOR_FILE, preprocessor_config(cfg))
    _dump(out / GENERATION_CONFIG_FILE, {**gen, "_from_model_config": False, "transformers_version": "4.57.0"})
    files += [CONFIG_FILE, PREPROCESSOR_FILE, GENERATION_CONFIG_FILE]
    if preset not in CONFIG_ONLY_PRESETS:
        import torch

        from nemovl_trt.checkpoint.weights import expected_tensors, init_weights

        vlm: VLMConfig = parse_vlm_config(cfg, preprocessor_config(cfg))
        dtype = getattr(torch, vlm.torch_dtype)
        tensors = {k: (v.to(dtype) if v.dtype.is_floating_point else v) for k, v in init_weights(vlm, seed).items()}
        assert list(tensors) == list(expected_tensors(vlm))
        files += save_tensors(out, tensors, shard_bytes)
        n_params = sum(t.numel() for t in tensors.values())
    for f in files:
        (out / f).chmod(0o644)  # safetensors creates 0600 files; checkpoints are shared read-only data
    total = sum((out / f).stat().st_size for f in files)
    return WrittenCheckpoint(path=out, files=tuple(sorted(files)), total_bytes=total, num_parameters=n_params)
