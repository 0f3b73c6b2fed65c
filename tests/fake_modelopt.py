"""FAKE ModelOpt for the CPU tests — not ModelOpt; it quantizes nothing. `quantize(model, config,
forward_loop)` and `export_hf_checkpoint(model, dtype, export_dir, ...)` are bound against the signatures
recorded from ModelOpt's source (tests/data/upstream/modelopt.json). quantize calls the forward loop with
the module it was given, as ModelOpt's calibration does; the export writes what ModelOpt's HF export
writes and nothing else (config.json with quantization_config, hf_quant_config.json, weights): no
tokenizer, no preprocessor config, no remote code, no auto_map."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

from tests.upstream_contract import check_call, members

LIB = "modelopt"


class Calls:
    quantized: list[Any] = []
    calibrated_with: list[Any] = []


def quantize(*args: Any, **kwargs: Any) -> Any:
    a = check_call(LIB, "modelopt.torch.quantization.quantize", args, kwargs).arguments
    Calls.quantized.append((a["model"], a["config"]))
    loop = a.get("forward_loop")
    if loop is not None:
        loop(a["model"])
        Calls.calibrated_with.append(a["model"])
    return a["model"]


def export_hf_checkpoint(*args: Any, **kwargs: Any) -> None:
    a = check_call(LIB, "modelopt.torch.export.export_hf_checkpoint", args, kwargs).arguments
    out = Path(a["export_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model = a["model"]
    algo = Calls.quantized[-1][1]["algo"]
    cfg = {k: v for k, v in model.hf_config.items() if k != "auto_map"}
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": algo, "exclude_modules": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": algo,
                                                                           "exclude_modules": ["lm_head"]}}))
    (out / "model.safetensors").write_bytes(b"fake weights")


def modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(modelopt.torch.quantization, modelopt.torch.export) fakes."""
    mtq = types.ModuleType("modelopt.torch.quantization")
    mtq.__doc__ = "FAKE modelopt.torch.quantization (tests/fake_modelopt.py)"
    mtq.quantize = quantize
    for name in members(LIB, "modelopt.torch.quantization"):
        if name.endswith("_CFG"):
            setattr(mtq, name, {"algo": name.split("_")[0]})
    export = types.ModuleType("modelopt.torch.export")
    export.export_hf_checkpoint = export_hf_checkpoint
    return mtq, export
