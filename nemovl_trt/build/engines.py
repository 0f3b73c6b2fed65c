"""`nemovl-build engines`: checkpoint → engines dir for one target, step by step, skipping up-to-date steps.

Steps (each records a fingerprint = sha256 of its input files' hashes + its options in `.build_state.json`;
a step whose fingerprint is unchanged and whose recorded outputs are untouched is skipped; `force` rebuilds):
  vision_onnx    VisionEncoder → vision/model.onnx (target vision precision baked in)
  vision_check   ONNX Runtime vs PyTorch on random tiles; fails the build over the target's tolerance
  vision_engine  GPU targets: TensorRT plan vision/model.plan (+ vision/timing.cache)
  llm_weights    llm/: cpu: the checkpoint (linked); GPU: BF16 linked, FP8/NVFP4 validated or ModelOpt
  llm_options    GPU targets: llm/llm_api_options.yaml from the memory plan
  tokenizer      tokenizer/: the tokenizer files
  manifest       manifest.json (what the Triton generator reads)
A GPU step on a machine without a GPU of the target's architecture is reported, the steps that do not
depend on it still run, and the build ends with `GpuUnavailable` (no manifest is written).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nemovl_trt.build import bundle_contents as bc
from nemovl_trt.build import manifest as mf
from nemovl_trt.build import onnx_export as ox
from nemovl_trt.build import trtllm_bundle as tb
from nemovl_trt.build.plan import MemoryPlan, plan_memory
from nemovl_trt.build.targets import TargetConfig
from nemovl_trt.build.tensorrt_build import GpuUnavailable, TrtProfile, build_vision_engine, tensorrt_version
from nemovl_trt.checkpoint.config import VLMConfig, load_vlm_config

BUILD_FORMAT_VERSION = 1  # bump when a step's outputs change for the same inputs/options
STATE_FILE = ".build_state.json"
VISION_ONNX = "vision/model.onnx"
VISION_PLAN = "vision/model.plan"
VISION_TIMING_CACHE = "vision/timing.cache"
ONNX_CHECK_FILE = "vision/onnx_check.json"
LLM_DIR = "llm"
TOKENIZER_DIR = "tokenizer"
CHECK_BATCHES = (1, 3)
CHECK_SEED = 0


class BuildError(RuntimeError):
    """A build step failed for a reason the user can fix (message is one sentence)."""


@dataclass
class BuildReport:
    """What happened: per step 'built' | 'skipped' | 'needs_gpu' | 'blocked'."""

    out_dir: Path
    statuses: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    gpu_errors: list[str] = field(default_factory=list)
    plan: MemoryPlan | None = None
    onnx_check: dict[str, Any] | None = None

    @property
    def all_skipped(self) -> bool:
        return all(s == "skipped" for s in self.statuses.values())


class _State:
    """`.build_state.json`: per step fingerprint/outputs/info, plus a sha256 cache keyed by (size, mtime)."""

    def __init__(self, path: Path):
        self.path = path
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                data = {}
        if data.get("version") != BUILD_FORMAT_VERSION:
            data = {}
        self.steps: dict[str, Any] = data.get("steps", {})
        self.hashes: dict[str, list] = data.get("hashes", {})

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        cached = self.hashes.get(key)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        digest = mf.sha256_file(path)
        self.hashes[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": BUILD_FORMAT_VERSION, "steps": self.steps, "hashes": self.hashes},
                                  indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(self.path)


def _fingerprint(name: str, input_hashes: dict[str, str], options: dict[str, Any]) -> str:
    import hashlib

    blob = json.dumps({"step": name, "version": BUILD_FORMAT_VERSION, "inputs": input_hashes, "options": options},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Runner:
    """Runs steps in order with progress, up-to-date checks and GPU-failure bookkeeping."""

    def __init__(self, out: Path, force: bool, total: int, log: Callable[[str], None]):
        self.out = out
        self.force = force
        self.state = _State(out / STATE_FILE)
        self.report = BuildReport(out_dir=out)
        self.bar = tqdm(total=total, desc="engines", unit="step", leave=False, disable=None)  # no bar off a tty
        self._log = log

    def log(self, message: str) -> None:
        """Print a line without tearing the progress bar."""
        with tqdm.external_write_mode():
            self._log(message)

    def _outputs_intact(self, rec: dict[str, Any]) -> bool:
        for rel, (size, mtime) in rec.get("outputs", {}).items():
            p = self.out / rel
            if not p.is_file():
                return False
            st = p.stat()
            if st.st_size != size or st.st_mtime_ns != mtime:
                return False
        return True

    def step(self, name: str, inputs: dict[str, Path], options: dict[str, Any],
             run: Callable[[], tuple[list[Path], dict[str, Any]]], needs: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Run (or skip) one step. `inputs` maps a stable label to a file; `run` returns (output files, info).
        Returns the step's info (fresh or recorded), or None when it could not run here."""
        self.bar.set_description(name)
        try:
            blocked = [n for n in needs if self.report.statuses.get(n) in ("needs_gpu", "blocked")]
            if blocked:
                self.report.statuses[name] = "blocked"
                self.log(f"[{name}] not run: needs {', '.join(blocked)}")
                return None
            hashes = {label: self.state.sha256(p) for label, p in sorted(inputs.items())}
            fp = _fingerprint(name, hashes, options)
            rec = self.state.steps.get(name)
            if not self.force and rec and rec.get("fingerprint") == fp and self._outputs_intact(rec):
                self.report.statuses[name] = "skipped"
                self.log(f"[{name}] up to date, skipped")
                return rec.get("info", {})
            if name != "manifest":  # an output is about to change: the old manifest no longer describes the dir
                self.invalidate_manifest()
            t0 = time.perf_counter()
            try:
                outputs, info = run()
            except GpuUnavailable as e:
                self.report.statuses[name] = "needs_gpu"
                self.report.gpu_errors.append(str(e))
                self.state.steps.pop(name, None)
                self.log(f"[{name}] not run: {e}")
                return None
            secs = time.perf_counter() - t0
            outs = {}
            for p in outputs:
                st = p.stat()
                outs[str(p.relative_to(self.out))] = [st.st_size, st.st_mtime_ns]
                self.state.sha256(p)
            info = {**info, "seconds": round(secs, 3)}
            self.state.steps[name] = {"fingerprint": fp, "outputs": outs, "info": info}
            self.state.save()
            self.report.statuses[name] = "built"
            self.log(f"[{name}] built in {secs:.1f} s")
            return info
        finally:
            self.bar.update(1)

    def invalidate_manifest(self) -> None:
        """Remove manifest.json and its record (a later successful run writes it again)."""
        (self.out / mf.MANIFEST_FILE).unlink(missing_ok=True)
        if self.state.steps.pop("manifest", None) is not None:
            self.state.save()

    def output_hashes(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rec in self.state.steps.values():
            for rel in rec.get("outputs", {}):
                if rel != mf.MANIFEST_FILE:
                    out[rel] = self.state.sha256(self.out / rel)
        return dict(sorted(out.items()))


def _checkpoint_inputs(ckpt: Path, files: list[Path]) -> dict[str, Path]:
    return {f"checkpoint/{p.name}": p for p in files}


def _weights_and_configs(ckpt: Path) -> list[Path]:
    """config/preprocessor files and the safetensors weights (+ index) of a checkpoint."""
    return [p for p in tb.checkpoint_files(ckpt)
            if p.suffix == ".safetensors" or p.name in ("config.json", "preprocessor_config.json",
                                                        "model.safetensors.index.json")]


def build_engines(ckpt_dir: str | Path, target: TargetConfig, out_dir: str | Path, force: bool = False,
                  model_id: str = mf.DEFAULT_MODEL_ID, log: Callable[[str], None] = print) -> BuildReport:
    """Build the engines dir for `target` from a checkpoint. Raises BuildError for user-fixable failures;
    GPU steps that cannot run here are listed in `report.gpu_errors` (the caller exits non-zero)."""
    t_start = time.perf_counter()
    ckpt = Path(ckpt_dir)
    cfg: VLMConfig = load_vlm_config(ckpt)
    plan = plan_memory(cfg, target)
    if plan.max_batch_size < 1:
        per = f" per GPU (world size {plan.world_size})" if plan.world_size > 1 else ""
        raise BuildError(f"target {target.name}: weights ({plan.weights_bytes / 1e9:.2f} GB) and activations "
                         f"({plan.activation_bytes / 1e9:.2f} GB) leave no room for one sequence of "
                         f"{plan.max_seq_len} tokens in the {plan.memory_budget_bytes / 1e9:.2f} GB budget{per}.")
    tok_files = tb.tokenizer_files(ckpt)
    if not tok_files:
        raise BuildError(f"{ckpt} has no tokenizer files ({', '.join(tb.TOKENIZER_FILES[:2])}).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _Runner(out, force, total=7 if target.is_gpu else 5, log=log)
    run.report.plan = plan
    try:
        _Steps(ckpt, cfg, target, plan, out, run, model_id).run_all()
    finally:
        run.bar.close()
        run.report.seconds = time.perf_counter() - t_start
    return run.report


@dataclass
class _Steps:
    """The build steps of one engines dir, in order (see the module docstring)."""

    ckpt: Path
    cfg: VLMConfig
    target: TargetConfig
    plan: MemoryPlan
    out: Path
    run: _Runner
    model_id: str
    _encoder: Any = None

    @property
    def gpu(self) -> bool:
        return self.target.is_gpu

    @property
    def onnx_path(self) -> Path:
        return self.out / VISION_ONNX

    def encoder(self) -> Any:
        """The fp32 PyTorch VisionEncoder, loaded once and only when a vision step actually runs."""
        if self._encoder is None:
            self._encoder = ox.load_vision_encoder(self.ckpt)[1]
        return self._encoder

    def onnx_files(self) -> dict[str, Path]:
        return {f"out/{p.name}": p for p in sorted(self.onnx_path.parent.glob("model.onnx*"))}

    def profile(self) -> TrtProfile:
        """TensorRT profile: 1 tile / one image with its thumbnail / the largest image batch of a request."""
        lim = self.target.limits
        per_image = lim.max_num_tiles + (1 if self.cfg.use_thumbnail and lim.max_num_tiles > 1 else 0)
        tiles = self.plan.vision_max_batch_tiles
        return TrtProfile(min_tiles=1, opt_tiles=min(per_image, tiles), max_tiles=tiles)

    def run_all(self) -> None:
        import torch

        t, run = self.target, self.run
        ckpt_weights = _checkpoint_inputs(self.ckpt, _weights_and_configs(self.ckpt))
        run.step("vision_onnx", ckpt_weights,
                 {"precision": t.vision_precision, "opset": t.vision.opset, "exporter": "torchscript",
                  "torch": torch.__version__, "tile": self.cfg.force_image_size}, self.vision_onnx)
        check = run.step("vision_check", {**self.onnx_files(), **ckpt_weights},
                         {"tolerance": t.vision.max_abs_error, "batches": list(CHECK_BATCHES), "seed": CHECK_SEED},
                         self.vision_check, needs=("vision_onnx",))
        if check is not None and run.report.statuses.get("vision_check") == "skipped":
            run.log(f"[vision_check] recorded max abs error {check['max_abs_error']:.3e} "
                    f"(tolerance {check['tolerance']:.1e})")
        run.report.onnx_check = check
        if self.gpu:
            run.step("vision_engine", self.onnx_files(),
                     {"arch": t.arch, "profile": self.profile().__dict__, "tensorrt": tensorrt_version()},
                     self.vision_engine, needs=("vision_check",))
        all_files = tb.checkpoint_files(self.ckpt)
        llm = run.step("llm_weights", _checkpoint_inputs(self.ckpt, all_files),
                       {"precision": t.llm_precision, "gpu": self.gpu}, lambda: self.llm_weights(all_files))
        if self.gpu:
            run.step("llm_options", {}, {"options": tb.llm_api_options(t, self.plan)},
                     lambda: ([tb.write_llm_api_options(t, self.plan, self.out / LLM_DIR)], {}))
        tok_files = tb.tokenizer_files(self.ckpt)
        run.step("tokenizer", _checkpoint_inputs(self.ckpt, tok_files), {},
                 lambda: (tb.link_files(tok_files, self.out / TOKENIZER_DIR), {}))
        if run.report.gpu_errors:
            run.report.statuses["manifest"] = "blocked"
            return
        body = _manifest(self.cfg, t, self.plan, self.model_id, check or {}, llm or {}, self.profile(),
                         {p.name: run.state.sha256(p) for p in all_files}, run.output_hashes(), run.state.steps)
        run.step("manifest", {}, {"manifest": body}, lambda: ([mf.write_manifest(self.out, body)], {}))

    # ---- (a) vision encoder → ONNX, checked ------------------------------------------------------------
    def vision_onnx(self) -> tuple[list[Path], dict[str, Any]]:
        for stale in self.onnx_path.parent.glob("model.onnx*"):
            stale.unlink()
        t = self.target
        ox.export_vision_onnx(self.cfg, self.encoder(), self.onnx_path, t.vision_precision, t.vision.opset)
        files = sorted(self.onnx_path.parent.glob("model.onnx*"))  # + external data when > 2 GB
        return files, {"precision": t.vision_precision, "opset": t.vision.opset}

    def vision_check(self) -> tuple[list[Path], dict[str, Any]]:
        t = self.target
        check = ox.check_vision_onnx(self.cfg, self.encoder(), self.onnx_path, t.vision.max_abs_error,
                                     CHECK_BATCHES, CHECK_SEED)
        self.run.log(f"[vision_check] ONNX Runtime vs PyTorch on {'+'.join(map(str, CHECK_BATCHES))} random "
                     f"tiles: max abs error {check.max_abs_error:.3e} (tolerance {check.tolerance:.1e}, "
                     f"max |reference| {check.max_abs_reference:.3e})")
        if not check.passed:
            raise BuildError(f"the vision ONNX graph differs from PyTorch by {check.max_abs_error:.3e}, over "
                             f"target {t.name}'s tolerance vision.max_abs_error = {check.tolerance:.1e}.")
        path = self.out / ONNX_CHECK_FILE
        path.write_text(json.dumps(check.to_dict(), indent=2) + "\n", encoding="utf-8")
        return [path], check.to_dict()

    # ---- (b) TensorRT plan ----------------------------------------------------------------------------
    def vision_engine(self) -> tuple[list[Path], dict[str, Any]]:
        plan_path, cache = self.out / VISION_PLAN, self.out / VISION_TIMING_CACHE
        build_vision_engine(self.target, self.onnx_path, plan_path, cache, ox.INPUT_NAME,
                            self.cfg.force_image_size, self.profile())
        return [plan_path, cache], {"profile": self.profile().__dict__}

    # ---- (c) LLM bundle -------------------------------------------------------------------------------
    def llm_weights(self, all_files: list[Path]) -> tuple[list[Path], dict[str, Any]]:
        prec, llm_dir = self.target.llm_precision, self.out / LLM_DIR
        if not self.gpu:  # the reference engine casts on load
            return tb.link_files(all_files, llm_dir), {"source": "checkpoint", "precision": prec}
        files, info = self._gpu_weights(all_files, llm_dir, prec)
        # what LLM(model=llm_dir, trust_remote_code=True) needs beyond the weights (docs/trtllm.md §5)
        extra = bc.complete_bundle(self.ckpt, llm_dir)
        bc.check_bundle(llm_dir)
        return sorted(set(files) | set(extra)), {**info, "precision": prec}

    def _gpu_weights(self, all_files: list[Path], llm_dir: Path, prec: str) -> tuple[list[Path], dict[str, Any]]:
        """The weights of a GPU bundle in the target precision: linked, converted, validated or quantized."""
        if prec in ("bf16", "fp32"):
            if tb.float_dtypes(self.ckpt) == {tb.SAFETENSORS_DTYPE[prec]}:
                return tb.link_files(all_files, llm_dir), {"source": "checkpoint"}
            dtype_name = {"bf16": "bfloat16", "fp32": "float32"}[prec]
            return tb.convert_checkpoint_dtype(self.ckpt, llm_dir, dtype_name), {"source": f"converted to {dtype_name}"}
        if tb.quantization_info(self.ckpt) is not None:
            info = tb.validate_quantized_checkpoint(self.ckpt, self.cfg, prec)
            return tb.link_files(all_files, llm_dir), info
        info = tb.quantize_with_modelopt(self.target, self.ckpt, llm_dir, prec)
        return [p for p in tb.checkpoint_files(llm_dir) if p.name != tb.LLM_API_OPTIONS_FILE], info

def _manifest(cfg: VLMConfig, target: TargetConfig, plan: MemoryPlan, model_id: str, check: dict[str, Any],
              llm_info: dict[str, Any], profile: TrtProfile, inputs: dict[str, str], outputs: dict[str, str],
              steps: dict[str, Any]) -> dict[str, Any]:
    """The manifest body (deterministic for the same build: no wall-clock timestamps)."""
    gpu = target.is_gpu
    lim = target.limits
    return {
        "manifest_version": mf.MANIFEST_VERSION,
        "model_id": model_id,
        "target": {"name": target.name, "description": target.description, "arch": target.arch, "gpu": gpu,
                   "gpu_memory_gib": target.gpu_memory_gib, "hbm_bandwidth_gbps": target.hbm_bandwidth_gbps},
        "precisions": {"llm": target.llm_precision, "vision": target.vision_precision,
                       "kv_cache": target.kv_cache_dtype, "mamba_ssm_cache": target.trtllm.mamba_ssm_cache_dtype},
        "limits": {"max_batch_size": plan.engine_max_batch_size, "max_batch_size_fit": plan.max_batch_size,
                   "max_batch_size_configured": lim.max_batch_size, "max_num_tokens": lim.max_num_tokens,
                   "max_seq_len": plan.max_seq_len, "max_num_tiles": lim.max_num_tiles,
                   "max_images": lim.max_images, "max_video_frames": lim.max_video_frames,
                   "vision_max_batch_tiles": plan.vision_max_batch_tiles},
        "parallel": mf.parallel_section(target),
        "serving": mf.serving_section(target),
        "paths": {"vision_onnx": VISION_ONNX, "vision_plan": VISION_PLAN if gpu else None,
                  "onnx_check": ONNX_CHECK_FILE, "llm_dir": LLM_DIR,
                  "llm_api_options": f"{LLM_DIR}/{tb.LLM_API_OPTIONS_FILE}" if gpu else None,
                  "tokenizer_dir": TOKENIZER_DIR},
        "vision": {"runtime": "tensorrt" if gpu else "onnxruntime", "input_name": ox.INPUT_NAME,
                   "input_dtype": "float32", "input_shape": [-1, 3, cfg.force_image_size, cfg.force_image_size],
                   "output_name": ox.OUTPUT_NAME, "output_dtype": "float32",
                   "output_shape": [-1, cfg.tokens_per_tile, cfg.llm.hidden_size],
                   "tokens_per_tile": cfg.tokens_per_tile, "opset": target.vision.opset,
                   "trt_profile": profile.__dict__ if gpu else None},
        "llm": {"engine": "tensorrt_llm_pytorch" if gpu else "reference", **{k: v for k, v in llm_info.items()
                                                                            if k != "seconds"},
                "hidden_size": cfg.llm.hidden_size, "vocab_size": cfg.llm.vocab_size},
        "model": {"video_pruning_rate": cfg.video_pruning_rate, "max_sequence_length": cfg.max_sequence_length,
                  "img_context_token_id": cfg.img_context_token_id, "tokens_per_tile": cfg.tokens_per_tile},
        "plan": plan.to_dict(),
        "onnx_check": {k: v for k, v in check.items() if k != "seconds"},
        "tool_versions": mf.tool_versions(),
        "inputs": inputs,
        "outputs": outputs,
        "build_seconds": {name: rec.get("info", {}).get("seconds") for name, rec in sorted(steps.items())
                          if name != "manifest"},
    }
