"""The LLM part of the engines dir.

cpu target: `llm/` is the checkpoint itself (hard-linked, else copied) for the PyTorch reference engine.
GPU targets: `llm/` is a TensorRT-LLM PyTorch-backend bundle: the checkpoint in the target precision
(BF16 linked; FP8/NVFP4 either an already-quantized ModelOpt checkpoint, validated here, or produced with
ModelOpt on a GPU of the target's architecture) plus `llm_api_options.yaml` derived from the memory plan.
`tokenizer/` gets the tokenizer files in both cases.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from nemovl_trt.build.plan import MemoryPlan
from nemovl_trt.build.targets import TargetConfig
from nemovl_trt.build.tensorrt_build import require_gpu
from nemovl_trt.checkpoint.config import VLMConfig, read_json

LLM_API_OPTIONS_FILE = "llm_api_options.yaml"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   # eos ids: load_tokenizer reads them from here when present (else only tokenizer_config's eos)
                   "generation_config.json")
# ModelOpt quant_algo names per target precision.
QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
SAFETENSORS_DTYPE = {"bf16": "BF16", "fp32": "F32", "fp16": "F16"}
# Decoder Linear layers ModelOpt quantizes (mixer sub-modules, by layer type).
QUANTIZED_LINEARS = {"mamba": ("in_proj", "out_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                     "mlp": ("up_proj", "down_proj")}
LLM_LAYER_PREFIX = "language_model.backbone.layers."
NVFP4_BLOCK = 16
# Modules that stay 16-bit in a quantized bundle (vision tower, projector) and the text prompts used to
# calibrate the language model.
UNQUANTIZED_MODULES = ("vision_model*", "mlp1*")
CALIBRATION_PROMPTS = ("Describe the invoice total and the due date.", "Summarize the chart in one sentence.",
                       "What happens in this video?", "List the steps in the manual.")


class BundleError(ValueError):
    """The checkpoint cannot become the target's LLM bundle (wrong / incomplete quantization, ...)."""


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (same filesystem), else copy it; replaces an existing `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as a new file at `path`: an existing file is unlinked first, so a hard link into the
    source checkpoint is never written through."""
    path.unlink(missing_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The regular files of a checkpoint directory (top level, hidden files skipped), sorted."""
    return sorted(p for p in ckpt_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def tokenizer_files(ckpt_dir: Path) -> list[Path]:
    """The tokenizer files present in a checkpoint directory."""
    return [ckpt_dir / n for n in TOKENIZER_FILES if (ckpt_dir / n).is_file()]


def link_files(files: list[Path], out_dir: Path) -> list[Path]:
    """Link/copy `files` into `out_dir`, removing files there that are not in the list. Returns the new paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in files}
    for old in out_dir.iterdir():
        if old.is_file() and old.name not in names and old.name != LLM_API_OPTIONS_FILE:
            old.unlink()
    out = []
    for f in files:
        link_or_copy(f, out_dir / f.name)
        out.append(out_dir / f.name)
    return out


def float_dtypes(ckpt_dir: Path) -> set[str]:
    """Safetensors dtype names (e.g. "BF16", "F32") of the floating-point tensors of a checkpoint."""
    return {dt for dt, _ in _tensor_meta(ckpt_dir).values() if dt.startswith(("F", "BF"))}


def convert_checkpoint_dtype(ckpt_dir: Path, out_dir: Path, dtype_name: str = "bfloat16") -> list[Path]:
    """Write the checkpoint into `out_dir` with every floating-point tensor cast to `dtype_name` (shard by
    shard, same file names; the index's total_size and config.json's torch_dtype keys updated); the other
    files are linked. Returns the files of `out_dir`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nemovl_trt.checkpoint.loader import weight_files

    dtype = getattr(torch, dtype_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(set(weight_files(ckpt_dir).values()))
    total = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: (t.to(dtype) if t.dtype.is_floating_point else t)
                       for k in f.keys() for t in (f.get_tensor(k),)}  # noqa: SIM118
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        dst = out_dir / shard.name
        if dst.exists():
            dst.unlink()
        save_file(tensors, str(dst), metadata=meta)
        dst.chmod(0o644)  # safetensors writes 0600
    written = {s.name for s in shards}
    for f in checkpoint_files(ckpt_dir):
        if f.name in written:
            continue
        if f.name == "config.json":
            cfg = read_json(f)
            for section in (cfg, cfg.get("llm_config") or {}, cfg.get("vision_config") or {}):
                if "torch_dtype" in section:
                    section["torch_dtype"] = dtype_name
            replace_json(out_dir / f.name, cfg)
        elif f.name.endswith(".index.json"):
            index = read_json(f)
            index.setdefault("metadata", {})["total_size"] = total
            replace_json(out_dir / f.name, index)
        else:
            link_or_copy(f, out_dir / f.name)
    names = {f.name for f in checkpoint_files(ckpt_dir)}
    for old in checkpoint_files(out_dir):
        if old.name not in names and old.name != LLM_API_OPTIONS_FILE:
            old.unlink()
    return [out_dir / n for n in sorted(names)]


# ---- LLM API options ---------------------------------------------------------------------------------
def cuda_graph_batch_sizes(target: TargetConfig, max_batch: int) -> list[int]:
    """The target's CUDA-graph batch sizes up to `max_batch`, plus `max_batch` itself so every batch the
    engine admits is padded to a captured graph."""
    sizes = [b for b in target.trtllm.cuda_graph_batch_sizes if b <= max_batch]
    if max_batch > 0 and (not sizes or sizes[-1] != max_batch):
        sizes.append(max_batch)
    return sizes


def llm_api_options(target: TargetConfig, plan: MemoryPlan) -> dict[str, Any]:
    """TensorRT-LLM LLM-API options (`trtllm-serve --extra_llm_api_options` / `LLM(**options)`) from the
    plan: batch = min(fits, target cap), tokens and sequence length as planned, KV cache in the planned dtype
    with Mamba SSM state in float32 and block reuse off (hybrid model)."""
    t = target.trtllm
    return {
        "backend": "pytorch",
        # the model type is not built into transformers: its config class comes from the bundle's remote
        # code (auto_map), and TensorRT-LLM's Nano VL input processor refuses to run without this
        "trust_remote_code": True,
        # one replica spans tp × pp GPUs of one node; LLM(...) needs that many visible devices
        "tensor_parallel_size": plan.tensor_parallel_size,
        "pipeline_parallel_size": plan.pipeline_parallel_size,
        "max_batch_size": plan.engine_max_batch_size,
        "max_num_tokens": plan.max_num_tokens,
        "max_seq_len": plan.max_seq_len,
        "enable_chunked_prefill": t.enable_chunked_prefill,
        # a streamed response every N iterations (first and last at once): fewer responses through the Triton
        # llm model's IPC under load (serving.stream_interval; upstream applies it at every batch size)
        "stream_interval": target.serving.stream_interval,
        # structured output (response_format, GuidedDecodingParams per request): the grammar engine the cpu
        # reference engine uses too (docs/api.md "Structured output")
        "guided_decoding_backend": "llguidance",
        "kv_cache_config": {
            "free_gpu_memory_fraction": t.free_gpu_memory_fraction,
            "enable_block_reuse": t.enable_block_reuse,
            "mamba_ssm_cache_dtype": t.mamba_ssm_cache_dtype,
            "dtype": "fp8" if plan.kv_cache_dtype == "fp8" else "auto",
        },
        "cuda_graph_config": {
            "batch_sizes": cuda_graph_batch_sizes(target, plan.engine_max_batch_size),
            "enable_padding": True,
        },
    }


def write_llm_api_options(target: TargetConfig, plan: MemoryPlan, llm_dir: Path) -> Path:
    """Write `llm_dir/llm_api_options.yaml`."""
    llm_dir.mkdir(parents=True, exist_ok=True)
    path = llm_dir / LLM_API_OPTIONS_FILE
    header = (f"# TensorRT-LLM LLM-API options for target {target.name} ({target.arch}), from `nemovl-build plan`:\n"
              f"# {plan.max_batch_size} sequences fit at max_seq_len {plan.max_seq_len}; target cap "
              f"{plan.max_batch_size_configured}; world size {plan.world_size} (tp "
              f"{plan.tensor_parallel_size} × pp {plan.pipeline_parallel_size}).\n")
    path.write_text(header + yaml.safe_dump(llm_api_options(target, plan), sort_keys=False), encoding="utf-8")
    return path


# ---- quantized checkpoints ---------------------------------------------------------------------------
def quantization_info(ckpt_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's quantization description: config.json `quantization_config` (HF style) or
    `hf_quant_config.json` (ModelOpt style, under "quantization"); None for an unquantized checkpoint.
    Returns {"quant_algo", "kv_cache_quant_algo", "exclude_modules"}."""
    cfg = read_json(ckpt_dir / "config.json")
    q = cfg.get("quantization_config") or (cfg.get("llm_config") or {}).get("quantization_config")
    if not q and (ckpt_dir / HF_QUANT_CONFIG_FILE).is_file():
        q = read_json(ckpt_dir / HF_QUANT_CONFIG_FILE).get("quantization")
    if not q:
        return None
    if not isinstance(q, dict) or not isinstance(q.get("quant_algo"), str):
        raise BundleError(f"{ckpt_dir}: quantization_config has no 'quant_algo' string.")
    exclude = q.get("exclude_modules", q.get("ignore", [])) or []
    return {"quant_algo": q["quant_algo"].upper(), "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
            "exclude_modules": [str(e) for e in exclude]}


def quantized_linears(cfg: VLMConfig, exclude: list[str]) -> list[tuple[str, int, int]]:
    """(module name, out_features, in_features) of every decoder Linear expected quantized, minus excludes."""
    llm = cfg.llm
    h = llm.hidden_size
    q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    shapes = {"in_proj": (llm.mamba_in_proj_dim, h), "out_proj": (h, llm.mamba_d_inner), "q_proj": (q, h),
              "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "up_proj": (llm.intermediate_size, h),
              "down_proj": (h, llm.intermediate_size)}
    out = []
    for i, kind in enumerate(llm.layer_types):
        for lin in QUANTIZED_LINEARS[kind]:
            name = f"{LLM_LAYER_PREFIX}{i}.mixer.{lin}"
            if any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(name.removeprefix("language_model."), pat)
                   for pat in exclude):
                continue
            out.append((name, *shapes[lin]))
    return out


def _tensor_meta(ckpt_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (dtype name, shape) for every tensor, read from safetensors headers only."""
    from safetensors import safe_open

    from nemovl_trt.checkpoint.loader import weight_files

    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(ckpt_dir).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for n in names:
                sl = f.get_slice(n)
                meta[n] = (str(sl.get_dtype()).upper(), tuple(int(s) for s in sl.get_shape()))
    return meta


def validate_quantized_checkpoint(ckpt_dir: Path, cfg: VLMConfig, precision: str) -> dict[str, Any]:
    """Check an already-quantized ModelOpt checkpoint against the target precision: the quant_algo matches,
    and every quantized decoder Linear has the right weight dtype/shape and its scales.

    FP8: weight F8_E4M3 [out,in], weight_scale and input_scale F32 scalars.
    NVFP4: weight U8 [out,in/2] (two 4-bit values per byte), weight_scale F8_E4M3 [out,in/16],
    weight_scale_2 and input_scale F32 scalars. Returns a summary for the manifest."""
    info = quantization_info(ckpt_dir)
    want = QUANT_ALGO[precision]
    if info is None:
        raise BundleError(f"{ckpt_dir} is not quantized, but the target needs {precision} weights.")
    if info["quant_algo"] != want:
        raise BundleError(f"{ckpt_dir} is quantized with {info['quant_algo']}, but the target needs {want}.")
    meta = _tensor_meta(ckpt_dir)
    linears = quantized_linears(cfg, info["exclude_modules"])
    if not linears:
        raise BundleError(f"{ckpt_dir}: quantization_config excludes every decoder Linear layer.")

    def expect(name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if name not in meta:
            raise BundleError(f"{ckpt_dir} is missing the {want} tensor '{name}'.")
        got_dtype, got_shape = meta[name]
        if got_dtype != dtype or (got_shape != shape and not (shape == () and got_shape in ((), (1,)))):
            raise BundleError(f"{ckpt_dir}: tensor '{name}' is {got_dtype} {list(got_shape)}, expected {dtype} "
                              f"{list(shape)} for {want}.")

    for name, out_f, in_f in linears:
        if precision == "fp8":
            expect(f"{name}.weight", "F8_E4M3", (out_f, in_f))
        else:
            expect(f"{name}.weight", "U8", (out_f, in_f // 2))
            expect(f"{name}.weight_scale", "F8_E4M3", (out_f, in_f // NVFP4_BLOCK))
            expect(f"{name}.weight_scale_2", "F32", ())
        if precision == "fp8":
            expect(f"{name}.weight_scale", "F32", ())
        expect(f"{name}.input_scale", "F32", ())
    return {"source": "pre-quantized", "quant_algo": info["quant_algo"],
            "kv_cache_quant_algo": info["kv_cache_quant_algo"], "quantized_linears": len(linears)}


def quantize_with_modelopt(target: TargetConfig, ckpt_dir: Path, out_dir: Path, precision: str) -> dict[str, Any]:
    """Quantize the LLM to `precision` with ModelOpt post-training quantization on a GPU of the target's
    architecture and export a Hugging Face checkpoint to `out_dir`. Needs `nvidia-modelopt`, `transformers`
    with the model's remote code (the Hugging Face BF16 checkpoint) and a CUDA build of torch; raises
    `GpuUnavailable` otherwise. The vision tower and projector stay in 16-bit. Not exercised in CI; the
    official -FP8 / -NVFP4-QAD checkpoints can be passed instead and are validated by
    `validate_quantized_checkpoint`. The bundle's other files are added by `bundle_contents.complete_bundle`."""
    mtq = require_gpu(target, "modelopt.torch.quantization", "ModelOpt")
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # as ModelOpt's own hf_ptq example loads remote-code VLMs: AutoModelForCausalLM + trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(str(ckpt_dir), trust_remote_code=True, dtype=torch.bfloat16).cuda()
    tok = AutoTokenizer.from_pretrained(str(ckpt_dir), trust_remote_code=True)
    quantize_and_export(mtq, export_hf_checkpoint, model, tok, out_dir, precision, device="cuda")
    return {"source": "modelopt", "quant_algo": QUANT_ALGO[precision]}


def quantize_and_export(mtq: Any, export_hf_checkpoint: Any, model: Any, tokenizer: Any, out_dir: Path,
                        precision: str, device: str) -> None:
    """ModelOpt PTQ of `model.language_model` only (text calibration prompts), HF export of the whole model
    to `out_dir`, then the vision tower and projector listed as excluded (ModelOpt lists only modules it
    put quantizers in, and TensorRT-LLM applies quant_algo to every Linear not excluded)."""
    quant_cfg = {"fp8": mtq.FP8_DEFAULT_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[precision]

    def forward_loop(lm: Any) -> None:  # ModelOpt passes the module being calibrated (the language model)
        for text in CALIBRATION_PROMPTS:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            lm(input_ids=ids)

    mtq.quantize(model.language_model, quant_cfg, forward_loop=forward_loop)
    export_hf_checkpoint(model, export_dir=str(out_dir))
    exclude_from_quantization(out_dir, UNQUANTIZED_MODULES)


def exclude_from_quantization(ckpt_dir: Path, patterns: tuple[str, ...]) -> None:
    """Add `patterns` to the exclude list of every quantization description in `ckpt_dir` (config.json
    `quantization_config`, hf_quant_config.json `quantization`)."""
    for name, key in (("config.json", "quantization_config"), (HF_QUANT_CONFIG_FILE, "quantization")):
        path = ckpt_dir / name
        if not path.is_file():
            continue
        data = read_json(path)
        section = data.get(key)
        if not isinstance(section, dict):
            continue
        have = list(section.get("exclude_modules") or [])
        section["exclude_modules"] = have + [p for p in patterns if p not in have]
        replace_json(path, data)
