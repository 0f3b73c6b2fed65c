"""Build targets: one YAML file per GPU SKU (or `cpu`) in `build_configs/`, validated into frozen dataclasses.

A target says which architecture the engines are compiled for, how much memory and bandwidth the GPU has,
which precision each part runs in, the limits baked into the engines and the TensorRT-LLM options.
Every problem is a `TargetError` with one sentence naming the file and the key, e.g.
"build_configs/a100.yaml: llm_precision fp8 needs sm89 or newer, but target a100 is sm80."
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUILD_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "build_configs"

# Compute capability each architecture name stands for; `none` is the CPU target.
ARCH_CAPABILITY: dict[str, tuple[int, int] | None] = {
    "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm90": (9, 0), "sm100": (10, 0), "none": None,
}

# Bytes per element of each precision name (nvfp4: 4-bit values; scales are counted by the plan).
PRECISION_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "nvfp4": 0.5}

# Oldest architecture with tensor-core support for a precision (None: no GPU needed / any target).
PRECISION_MIN_ARCH: dict[str, str | None] = {"fp32": None, "fp16": None, "bf16": "sm80", "fp8": "sm89",
                                             "nvfp4": "sm100"}

# What the CPU reference engine can run (the sm80 requirement of bf16 is about GPU tensor cores).
CPU_PRECISIONS = ("fp32", "bf16", "fp16")

LLM_PRECISIONS = ("fp32", "bf16", "fp8", "nvfp4")
VISION_PRECISIONS = ("fp32", "fp16", "bf16")
KV_CACHE_DTYPES = ("fp32", "bf16", "fp16", "fp8")
MAMBA_CACHE_DTYPES = ("float32", "bfloat16", "float16")

# GPUs one replica may span: one node's NVLink domain (8 GPUs in HGX/DGX A100, H100 and B200 nodes). Upstream
# TensorRT-LLM's NemotronHForCausalLM also refuses a tensor-parallel size outside 1, 2, 4, 8
# (tensorrt_llm/_torch/models/modeling_nemotron_h.py@00620eb0), and a 12B model never needs a second node.
MAX_WORLD_SIZE = 8


class TargetError(ValueError):
    """A build target file is missing, malformed, or asks for something its architecture cannot run."""


@dataclass(frozen=True)
class Limits:
    """Limits the engines are built for (per engine instance)."""

    max_batch_size: int  # cap on concurrent sequences (the plan may lower it to what fits in memory)
    max_num_tokens: int  # tokens per forward pass (prefill chunk budget)
    max_seq_len: int  # prompt + generated tokens of one sequence (capped by the checkpoint's max)
    max_num_tiles: int = 12  # tiles per image before the thumbnail
    max_images: int = 4  # images per request
    max_video_frames: int = 128  # sampled frames per video (one tile each)


@dataclass(frozen=True)
class VisionOptions:
    """Vision encoder export/check options."""

    opset: int = 18  # ONNX opset (>= 17: LayerNormalization)
    max_abs_error: float = 1e-4  # bound on |ONNX Runtime − PyTorch fp32| over random tiles


@dataclass(frozen=True)
class TrtllmOptions:
    """TensorRT-LLM PyTorch-backend LLM-API options (written to `llm_api_options.yaml`)."""

    free_gpu_memory_fraction: float = 0.9  # share of free memory (after weights) for KV + Mamba cache
    enable_block_reuse: bool = False  # KV block reuse is not supported for hybrid Mamba models
    mamba_ssm_cache_dtype: str = "float32"
    enable_chunked_prefill: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ParallelOptions:
    """Multi-GPU layout of one replica (`parallel:`): TensorRT-LLM tensor × pipeline parallel sizes."""

    tensor_parallel: int = 1  # GPUs each layer is split across (heads, KV heads, Mamba heads, MLP, vocab)
    pipeline_parallel: int = 1  # stages the layers are split into (one after another)

    @property
    def world_size(self) -> int:
        """GPUs (= ranks = processes) of one replica."""
        return self.tensor_parallel * self.pipeline_parallel


@dataclass(frozen=True)
class ServingOptions:
    """Serving-side knobs of a target (`serving:`), recorded in the manifest for the Triton repository helper.

    The CPU costs feed the plan's preprocessing-cores line; defaults are README / docs/benchmarks.md numbers
    measured by benchmarks/preprocess_bench.py on the 2-core CI VM (loaded machine)."""

    preprocessor_instances: int = 1  # Triton instances of the CPU preprocessor model
    vision_instances: int = 1  # Triton instances of the vision encoder per GPU
    cpu_ms_per_image: float = 90.0  # host CPU ms to decode + tile one 2048×1536 image into 13 tiles
    cpu_ms_per_video_frame: float = 23.0  # host CPU ms per sampled video frame (decode + resize)
    # Tokens per streamed llm response while >= stream_interval_min_batch sequences run (TensorRT-LLM's
    # LLM-API option of the same name on GPU targets, which applies it at every batch size): each response is
    # a blocking IPC round trip of the Triton Python backend (docs/triton.md "Stream interval").
    stream_interval: int = 4
    stream_interval_min_batch: int = 2


@dataclass(frozen=True)
class TargetConfig:
    """One build target (`build_configs/<name>.yaml`)."""

    name: str
    description: str
    arch: str  # sm80 | sm89 | sm90 | sm100 | none
    gpu_memory_gib: float  # device memory (GiB = 2**30 bytes); cpu: host RAM
    hbm_bandwidth_gbps: float  # memory bandwidth, GB/s (1e9 bytes/s)
    llm_precision: str
    vision_precision: str
    kv_cache_dtype: str
    limits: Limits
    llm_precision_options: tuple[str, ...] = ()
    memory_fraction: float = 0.9  # share of memory the plan may fill
    decode_context_fraction: float = 0.5  # decode roofline context = fraction × max_seq_len
    vision: VisionOptions = field(default_factory=VisionOptions)
    trtllm: TrtllmOptions = field(default_factory=TrtllmOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    serving: ServingOptions = field(default_factory=ServingOptions)
    # dense tensor-core peak TFLOPS per precision (public spec sheets, no sparsity): the prefill roofline
    tensor_tflops: tuple[tuple[str, float], ...] = ()
    source: str = field(default="", compare=False)  # file it was read from, for messages

    @property
    def is_gpu(self) -> bool:
        return self.arch != "none"

    @property
    def capability(self) -> tuple[int, int] | None:
        return ARCH_CAPABILITY[self.arch]

    def peak_tflops(self, precision: str) -> float | None:
        """Dense tensor-core TFLOPS of `precision` on this target (None when the file gives none)."""
        return dict(self.tensor_tflops).get(precision)

    def with_parallel(self, tensor_parallel: int | None = None, pipeline_parallel: int | None = None) -> TargetConfig:
        """This target with another tensor/pipeline-parallel size (the `--tp/--pp` flags), validated like the
        file (the checkpoint-dependent checks are in `plan.check_parallel`)."""
        tp = self.parallel.tensor_parallel if tensor_parallel is None else tensor_parallel
        pp = self.parallel.pipeline_parallel if pipeline_parallel is None else pipeline_parallel
        _check_parallel_sizes(tp, pp, self, f"target {self.name}", flags=True)
        return dataclasses.replace(self, parallel=ParallelOptions(tensor_parallel=tp, pipeline_parallel=pp))

    def with_llm_precision(self, precision: str) -> TargetConfig:
        """This target with another LLM precision (e.g. b200 with fp8), validated like the file."""
        if precision not in LLM_PRECISIONS:
            raise TargetError(f"{self.source}: llm_precision {precision} is not one of {', '.join(LLM_PRECISIONS)}.")
        if self.llm_precision_options and precision not in self.llm_precision_options:
            raise TargetError(f"{self.source}: llm_precision {precision} is not offered by target {self.name} "
                              f"(llm_precision_options: {', '.join(self.llm_precision_options)}).")
        kv = self.kv_cache_dtype
        if precision in ("bf16", "fp32") and kv == "fp8":
            kv = "bf16" if precision == "bf16" else "fp32"
        new = dataclasses.replace(self, llm_precision=precision, kv_cache_dtype=kv)
        _check_arch(new, self.source)
        return new


_TOP_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str, "description": str, "arch": str, "gpu_memory_gib": (int, float),
    "hbm_bandwidth_gbps": (int, float), "llm_precision": str, "llm_precision_options": list,
    "vision_precision": str, "kv_cache_dtype": str, "memory_fraction": (int, float),
    "decode_context_fraction": (int, float), "limits": dict, "vision": dict, "trtllm": dict,
    "parallel": dict, "serving": dict, "tensor_tflops": dict,
}
_REQUIRED_TOP = ("name", "arch", "gpu_memory_gib", "hbm_bandwidth_gbps", "llm_precision", "vision_precision",
                 "kv_cache_dtype", "limits")
_LIMIT_KEYS: dict[str, type | tuple[type, ...]] = {f.name: int for f in dataclasses.fields(Limits)}
_REQUIRED_LIMITS = ("max_batch_size", "max_num_tokens", "max_seq_len")
_VISION_KEYS: dict[str, type | tuple[type, ...]] = {"opset": int, "max_abs_error": (int, float)}
_TRTLLM_KEYS: dict[str, type | tuple[type, ...]] = {
    "free_gpu_memory_fraction": (int, float), "enable_block_reuse": bool, "mamba_ssm_cache_dtype": str,
    "enable_chunked_prefill": bool, "cuda_graph_batch_sizes": list,
}
_PARALLEL_KEYS: dict[str, type | tuple[type, ...]] = {"tensor_parallel": int, "pipeline_parallel": int}
_SERVING_KEYS: dict[str, type | tuple[type, ...]] = {
    "preprocessor_instances": int, "vision_instances": int, "cpu_ms_per_image": (int, float),
    "cpu_ms_per_video_frame": (int, float), "stream_interval": int, "stream_interval_min_batch": int,
}
_TFLOPS_KEYS: dict[str, type | tuple[type, ...]] = {p: (int, float) for p in PRECISION_BYTES}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true/false", list: "a list", dict: "a mapping",
               (int, float): "a number"}


def _check_section(d: dict[str, Any], schema: dict[str, Any], where: str, prefix: str) -> None:
    for key, value in d.items():
        if key not in schema:
            raise TargetError(f"{where}: unknown key '{prefix}{key}' (allowed: {', '.join(schema)}).")
        typ = schema[key]
        # bool is an int subclass: never accept true/false where a number is expected, and vice versa.
        bad_bool = isinstance(value, bool) and typ is not bool
        if bad_bool or not isinstance(value, typ):
            raise TargetError(f"{where}: '{prefix}{key}' must be {_TYPE_NAMES.get(typ, str(typ))}, "
                              f"got {type(value).__name__} {value!r}.")


def _arch_rank(arch: str) -> tuple[int, int]:
    cap = ARCH_CAPABILITY[arch]
    return cap if cap is not None else (-1, -1)


def _needs(precision: str, key: str, target: TargetConfig, where: str) -> None:
    need = PRECISION_MIN_ARCH[precision]
    if need is None or (not target.is_gpu and precision in CPU_PRECISIONS):
        return
    if not target.is_gpu:
        raise TargetError(f"{where}: {key} {precision} needs an NVIDIA GPU ({need} or newer), but target "
                          f"{target.name} is a cpu target.")
    if _arch_rank(target.arch) < _arch_rank(need):
        raise TargetError(f"{where}: {key} {precision} needs {need} or newer, but target {target.name} "
                          f"is {target.arch}.")


def _check_arch(t: TargetConfig, where: str) -> None:
    _needs(t.llm_precision, "llm_precision", t, where)
    _needs(t.kv_cache_dtype, "kv_cache_dtype", t, where)
    _needs(t.vision_precision, "vision_precision", t, where)
    for p in t.llm_precision_options:
        _needs(p, "llm_precision_options entry", t, where)
    if not t.is_gpu and t.vision_precision != "fp32":
        raise TargetError(f"{where}: vision_precision {t.vision_precision} is not supported on a cpu target "
                          f"(ONNX Runtime CPU runs the encoder in fp32).")


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _check_parallel_sizes(tp: Any, pp: Any, target: TargetConfig | None, where: str, flags: bool = False) -> None:
    """tp and pp: integers, powers of two ≥ 1, tp·pp ≤ MAX_WORLD_SIZE; both 1 on a cpu target."""
    names = ("--tp", "--pp") if flags else ("'parallel.tensor_parallel'", "'parallel.pipeline_parallel'")
    for name, value in zip(names, (tp, pp), strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or not _is_power_of_two(value):
            raise TargetError(f"{where}: {name} must be a power of two >= 1 (1, 2, 4, 8), got {value!r}.")
    if tp * pp > MAX_WORLD_SIZE:
        raise TargetError(f"{where}: tensor_parallel × pipeline_parallel = {tp} × {pp} = {tp * pp} GPUs is more "
                          f"than one {MAX_WORLD_SIZE}-GPU node; one replica must fit in a node.")
    if target is not None and not target.is_gpu and tp * pp != 1:
        raise TargetError(f"{where}: a cpu target runs the CPU reference engine in one process, so tensor_parallel "
                          f"and pipeline_parallel must be 1 (got {tp} and {pp}).")


def parse_target(d: Any, where: str) -> TargetConfig:
    """Validate a target mapping (as read from YAML) into a `TargetConfig`; `where` names the file."""
    if not isinstance(d, dict):
        raise TargetError(f"{where}: must hold a mapping of keys, got {type(d).__name__}.")
    _check_section(d, _TOP_KEYS, where, "")
    for key in _REQUIRED_TOP:
        if key not in d:
            raise TargetError(f"{where}: missing the key '{key}'.")
    limits_d, vision_d, trt_d = d["limits"], d.get("vision", {}), d.get("trtllm", {})
    _check_section(limits_d, _LIMIT_KEYS, where, "limits.")
    for key in _REQUIRED_LIMITS:
        if key not in limits_d:
            raise TargetError(f"{where}: missing the key 'limits.{key}'.")
    _check_section(vision_d, _VISION_KEYS, where, "vision.")
    _check_section(trt_d, _TRTLLM_KEYS, where, "trtllm.")
    par_d, srv_d, tflops_d = d.get("parallel", {}), d.get("serving", {}), d.get("tensor_tflops", {})
    _check_section(par_d, _PARALLEL_KEYS, where, "parallel.")
    _check_section(srv_d, _SERVING_KEYS, where, "serving.")
    _check_section(tflops_d, _TFLOPS_KEYS, where, "tensor_tflops.")
    for key in ("preprocessor_instances", "vision_instances", "stream_interval", "stream_interval_min_batch"):
        if key in srv_d and srv_d[key] < 1:
            raise TargetError(f"{where}: 'serving.{key}' must be >= 1, got {srv_d[key]}.")
    for key in ("cpu_ms_per_image", "cpu_ms_per_video_frame"):
        if key in srv_d and not srv_d[key] > 0:
            raise TargetError(f"{where}: 'serving.{key}' must be > 0, got {srv_d[key]}.")
    for key, value in tflops_d.items():
        if not value > 0:
            raise TargetError(f"{where}: 'tensor_tflops.{key}' must be > 0, got {value}.")

    arch = d["arch"]
    if arch not in ARCH_CAPABILITY:
        raise TargetError(f"{where}: arch '{arch}' is not one of {', '.join(ARCH_CAPABILITY)}.")
    for key, allowed in (("llm_precision", LLM_PRECISIONS), ("vision_precision", VISION_PRECISIONS),
                         ("kv_cache_dtype", KV_CACHE_DTYPES)):
        if d[key] not in allowed:
            raise TargetError(f"{where}: {key} '{d[key]}' is not one of {', '.join(allowed)}.")
    options = d.get("llm_precision_options", [])
    for p in options:
        if p not in LLM_PRECISIONS:
            raise TargetError(f"{where}: llm_precision_options entry '{p}' is not one of "
                              f"{', '.join(LLM_PRECISIONS)}.")
    if options and d["llm_precision"] not in options:
        raise TargetError(f"{where}: llm_precision {d['llm_precision']} is not in llm_precision_options.")
    for key, lo, hi in (("gpu_memory_gib", 0.0, None), ("hbm_bandwidth_gbps", 0.0, None),
                        ("memory_fraction", 0.0, 1.0), ("decode_context_fraction", 0.0, 1.0)):
        if key in d and not (d[key] > lo and (hi is None or d[key] <= hi)):
            raise TargetError(f"{where}: '{key}' must be > {lo}" + (f" and <= {hi}" if hi else "") +
                              f", got {d[key]}.")
    for key, value in limits_d.items():
        if value < 1:
            raise TargetError(f"{where}: 'limits.{key}' must be >= 1, got {value}.")
    if "opset" in vision_d and vision_d["opset"] < 17:
        raise TargetError(f"{where}: 'vision.opset' must be >= 17 (LayerNormalization), got {vision_d['opset']}.")
    if "max_abs_error" in vision_d and vision_d["max_abs_error"] <= 0:
        raise TargetError(f"{where}: 'vision.max_abs_error' must be > 0, got {vision_d['max_abs_error']}.")
    sizes = trt_d.get("cuda_graph_batch_sizes", [])
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes) or sizes != sorted(set(sizes)):
        raise TargetError(f"{where}: 'trtllm.cuda_graph_batch_sizes' must be increasing positive integers, "
                          f"got {sizes}.")
    if trt_d.get("mamba_ssm_cache_dtype", "float32") not in MAMBA_CACHE_DTYPES:
        raise TargetError(f"{where}: 'trtllm.mamba_ssm_cache_dtype' must be one of "
                          f"{', '.join(MAMBA_CACHE_DTYPES)}.")
    if trt_d.get("enable_block_reuse", False):
        raise TargetError(f"{where}: 'trtllm.enable_block_reuse' must be false: KV block reuse is not "
                          f"supported for the hybrid Mamba LLM.")
    frac = trt_d.get("free_gpu_memory_fraction", 0.9)
    if not 0.0 < frac <= 1.0:
        raise TargetError(f"{where}: 'trtllm.free_gpu_memory_fraction' must be in (0, 1], got {frac}.")
    lim_d = d["limits"]
    if not trt_d.get("enable_chunked_prefill", True) and lim_d["max_num_tokens"] < lim_d["max_seq_len"]:
        # without chunked prefill TensorRT-LLM refuses any prompt longer than max_num_tokens, and a
        # 128-frame video is > 30K tokens: every prompt the limits admit must fit one iteration
        raise TargetError(f"{where}: with 'trtllm.enable_chunked_prefill' false, 'limits.max_num_tokens' "
                          f"({lim_d['max_num_tokens']}) must be >= 'limits.max_seq_len' ({lim_d['max_seq_len']}).")

    target = TargetConfig(
        name=d["name"],
        description=d.get("description", d["name"]),
        arch=arch,
        gpu_memory_gib=float(d["gpu_memory_gib"]),
        hbm_bandwidth_gbps=float(d["hbm_bandwidth_gbps"]),
        llm_precision=d["llm_precision"],
        vision_precision=d["vision_precision"],
        kv_cache_dtype=d["kv_cache_dtype"],
        limits=Limits(**limits_d),
        llm_precision_options=tuple(options),
        memory_fraction=float(d.get("memory_fraction", 0.9)),
        decode_context_fraction=float(d.get("decode_context_fraction", 0.5)),
        vision=VisionOptions(**{k: (float(v) if k == "max_abs_error" else v) for k, v in vision_d.items()}),
        trtllm=TrtllmOptions(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in trt_d.items()}),
        parallel=ParallelOptions(**par_d),
        serving=ServingOptions(**{k: (float(v) if k.startswith("cpu_ms") else v) for k, v in srv_d.items()}),
        tensor_tflops=tuple(sorted((k, float(v)) for k, v in tflops_d.items())),
        source=where,
    )
    _check_arch(target, where)
    _check_parallel_sizes(target.parallel.tensor_parallel, target.parallel.pipeline_parallel, target, where)
    if tflops_d:
        for p in (target.llm_precision, *target.llm_precision_options):
            if p not in tflops_d:
                raise TargetError(f"{where}: 'tensor_tflops' has no entry for LLM precision {p} "
                                  f"(the prefill roofline needs one per llm_precision_options entry).")
    return target


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(BUILD_CONFIGS_DIR.parent))
    except ValueError:
        return str(path)


def available_targets() -> list[str]:
    """Names of the built-in targets (`build_configs/*.yaml`)."""
    return sorted(p.stem for p in BUILD_CONFIGS_DIR.glob("*.yaml"))


def load_target(name_or_path: str | Path) -> TargetConfig:
    """Load a target by name (`h100` → `build_configs/h100.yaml`) or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        path = p
    else:
        path = BUILD_CONFIGS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TargetError(f"unknown target '{name_or_path}' (choose from {', '.join(available_targets())} "
                              f"or give a path to a YAML file).")
    where = _display(path)
    if not path.is_file():
        raise TargetError(f"{where}: file not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TargetError(f"{where}: not valid YAML ({str(e).splitlines()[0]}).") from None
    return parse_target(data, where)
