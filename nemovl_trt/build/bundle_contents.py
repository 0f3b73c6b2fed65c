"""What a TensorRT-LLM bundle (`engines/<gpu target>/llm/`) must contain for `LLM(model=bundle, ...)`.

TensorRT-LLM loads the bundle's config with `transformers.AutoConfig.from_pretrained(bundle,
trust_remote_code=True)` and picks its model class and input processor from `architectures[0]`
(`NemotronH_Nano_VL_V2`, registered upstream). That model type is unknown to transformers, so config.json
needs an `auto_map["AutoConfig"]` whose module file is in the bundle; upstream's Nano input processor also
refuses to run without trust_remote_code and reads `preprocessor_config.json` and the tokenizer from the
bundle. So a bundle holds: config.json (with auto_map), the remote-code `.py` files it names,
preprocessor_config.json, generation_config.json, the tokenizer files, the weights and
llm_api_options.yaml (with `trust_remote_code: true`). Facts and sources: docs/trtllm.md §5.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from nemovl_trt.build.trtllm_bundle import TOKENIZER_FILES, BundleError, link_or_copy, replace_json
from nemovl_trt.checkpoint.config import read_json

MODEL_ARCHITECTURE = "NemotronH_Nano_VL_V2"
OWN_CONFIG_MODULE = "configuration_nemovl_vl"  # our config class, for checkpoints without remote code
OWN_CONFIG_CLASS = "NemovlNanoVLConfig"
CARRIED_FILES = ("preprocessor_config.json", "generation_config.json", *TOKENIZER_FILES)
# config.json keys the LLM and its input processor read (a quantizer's export must not lose them)
REQUIRED_CONFIG_KEYS = ("architectures", "model_type", "llm_config", "vision_config", "img_context_token_id",
                        "force_image_size", "patch_size", "downsample_ratio")


def auto_map_modules(config: dict[str, Any]) -> list[str]:
    """The local module files (`configuration.py`, ...) that config.json's `auto_map` names. References to
    another repository ("org/repo--module.Class") are returned as is, for `check_bundle` to reject."""
    modules = []
    for ref in (config.get("auto_map") or {}).values():
        ref = ref[0] if isinstance(ref, list | tuple) else ref
        if not isinstance(ref, str) or "." not in ref:
            continue
        module = ref.rsplit(".", 1)[0]
        modules.append(module if "--" in module else f"{module}.py")
    return sorted(set(modules))


def _own_config_module_source() -> str:
    return resources.files("nemovl_trt.build.remote_code").joinpath(f"{OWN_CONFIG_MODULE}.py").read_text("utf-8")


def complete_bundle(ckpt_dir: Path, bundle_dir: Path) -> list[Path]:
    """Add to `bundle_dir` what `LLM(model=bundle_dir, trust_remote_code=True)` needs and the weights step
    did not bring (a quantizer's export writes only config + weights): the checkpoint's remote-code `.py`
    files, preprocessor/generation config and tokenizer files, config keys the export dropped, and, for
    a checkpoint without remote code (ours), `configuration_nemovl_vl.py` + `auto_map`. Returns the bundle
    files it wrote or linked."""
    written: list[Path] = []
    for src in sorted(ckpt_dir.glob("*.py")) + [ckpt_dir / n for n in CARRIED_FILES]:
        dst = bundle_dir / src.name
        if src.is_file() and not dst.exists():
            link_or_copy(src, dst)
            written.append(dst)
    ckpt_cfg = read_json(ckpt_dir / "config.json")
    cfg_path = bundle_dir / "config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    changed = not cfg_path.is_file()
    for key in (*REQUIRED_CONFIG_KEYS, "auto_map"):
        if key not in cfg and key in ckpt_cfg:
            cfg[key] = ckpt_cfg[key]
            changed = True
    if not (cfg.get("auto_map") or {}).get("AutoConfig"):
        (bundle_dir / f"{OWN_CONFIG_MODULE}.py").write_text(_own_config_module_source(), encoding="utf-8")
        written.append(bundle_dir / f"{OWN_CONFIG_MODULE}.py")
        cfg["auto_map"] = {**(cfg.get("auto_map") or {}), "AutoConfig": f"{OWN_CONFIG_MODULE}.{OWN_CONFIG_CLASS}"}
        changed = True
    if changed:
        replace_json(cfg_path, cfg)
        written.append(cfg_path)
    return sorted(set(written))


def check_bundle(bundle_dir: Path, options: dict[str, Any] | None = None) -> None:
    """Raise BundleError (one sentence) for the first thing `LLM(model=bundle_dir, **options)` would miss."""
    cfg_path = bundle_dir / "config.json"
    if not cfg_path.is_file():
        raise BundleError(f"{bundle_dir} has no config.json.")
    cfg = read_json(cfg_path)
    arch = (cfg.get("architectures") or [None])[0]
    if arch != MODEL_ARCHITECTURE:
        raise BundleError(f"{cfg_path}: architectures[0] is {arch!r}; TensorRT-LLM serves this model as "
                          f"{MODEL_ARCHITECTURE!r}.")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise BundleError(f"{cfg_path} lacks {', '.join(missing)}.")
    if not (cfg.get("auto_map") or {}).get("AutoConfig"):
        raise BundleError(f"{cfg_path} has no auto_map.AutoConfig: transformers cannot load a "
                          f"{MODEL_ARCHITECTURE} config without it.")
    for module in auto_map_modules(cfg):
        if "--" in module:
            raise BundleError(f"{cfg_path}: auto_map points to another repository ({module}); the bundle must "
                              "be loadable offline, with its remote code inside it.")
        if not (bundle_dir / module).is_file():
            raise BundleError(f"{bundle_dir} lacks {module}, named by config.json's auto_map.")
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"{bundle_dir} lacks {name}.")
    if options is not None and options.get("trust_remote_code") is not True:
        raise BundleError("llm_api_options.yaml must set trust_remote_code: true (TensorRT-LLM's Nano VL "
                          "input processor refuses to run without it).")

