"""Reading the build manifest (`<engines>/manifest.json`, written by `nemovl-build engines`).

Every key the Triton side uses is looked up here, so a change of the manifest layout touches one file.
Paths in the manifest are relative to the engines directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key path (dotted) in `d`."""
    for key in keys:
        cur: Any = d
        ok = True
        for part in key.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                ok = False
                break
        if ok and cur is not None:
            return cur
    return default


def target(manifest: dict[str, Any]) -> str:
    """Build target name, e.g. "cpu" or "h100"."""
    t = _get(manifest, "target.name", "target")
    return str(t)


def is_cpu(manifest: dict[str, Any]) -> bool:
    return target(manifest) == "cpu"


def limits(manifest: dict[str, Any]) -> dict[str, Any]:
    """The limits the build baked in (max_batch_size, max_num_tokens, max_seq_len, max_num_tiles,
    max_images, max_video_frames)."""
    return dict(_get(manifest, "limits", "target.limits", default={}))


def precisions(manifest: dict[str, Any]) -> dict[str, str]:
    """{"llm": ..., "vision": ...}."""
    return {"llm": str(_get(manifest, "precisions.llm", "llm.precision", "llm_precision", default="")),
            "vision": str(_get(manifest, "precisions.vision", "vision.precision", "vision_precision",
                               default=""))}


def model_id(manifest: dict[str, Any]) -> str:
    return str(_get(manifest, "model_id", "model.id", "checkpoint.model_id",
                    default="nvidia/nemotron-nano-12b-v2-vl"))


def _path(engines_dir: Path, manifest: dict[str, Any], keys: tuple[str, ...], default: str) -> Path:
    rel = _get(manifest, *keys, default=default)
    return (engines_dir / str(rel)).resolve()


def llm_dir(engines_dir: Path, manifest: dict[str, Any]) -> Path:
    """cpu: the checkpoint directory; GPU: the TRT-LLM bundle."""
    return _path(engines_dir, manifest, ("paths.llm_dir", "llm.dir"), "llm")


def tokenizer_dir(engines_dir: Path, manifest: dict[str, Any]) -> Path:
    return _path(engines_dir, manifest, ("paths.tokenizer_dir", "tokenizer.dir"), "tokenizer")


def config_dir(engines_dir: Path, manifest: dict[str, Any]) -> Path:
    """Directory holding the checkpoint's config.json (and preprocessor_config.json)."""
    for cand in (llm_dir(engines_dir, manifest), tokenizer_dir(engines_dir, manifest), engines_dir):
        if (cand / "config.json").is_file():
            return cand
    return llm_dir(engines_dir, manifest)


def vision_onnx(engines_dir: Path, manifest: dict[str, Any]) -> Path:
    return _path(engines_dir, manifest, ("paths.vision_onnx",),
                 "vision/model.onnx")


def vision_plan(engines_dir: Path, manifest: dict[str, Any]) -> Path:
    return _path(engines_dir, manifest, ("paths.vision_plan",),
                 "vision/model.plan")


def vision_io_names(manifest: dict[str, Any]) -> tuple[str, str]:
    """(input name, output name) of the vision graph."""
    return (str(_get(manifest, "vision.input_name", "vision.input", default="pixel_values")),
            str(_get(manifest, "vision.output_name", "vision.output", default="embeddings")))


def llm_api_options(engines_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """GPU targets: the LLM-API options YAML of the bundle (empty for cpu)."""
    path = _path(engines_dir, manifest, ("paths.llm_api_options",),
                 "llm/llm_api_options.yaml")
    if not path.is_file():
        return {}
    import yaml

    return dict(yaml.safe_load(path.read_text()) or {})


def vision_shapes(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(tile size S of the [3,S,S] input, tokens per tile P, hidden D of the [P,D] output)."""
    vis = manifest["vision"]
    return int(vis["input_shape"][-1]), int(vis["output_shape"][-2]), int(vis["output_shape"][-1])


def video_pruning_rate(manifest: dict[str, Any]) -> float:
    """The checkpoint's default EVS rate."""
    return float(_get(manifest, "model.video_pruning_rate", default=0.0))


def llm_engine(manifest: dict[str, Any]) -> str:
    """The LLM engine the build made: "reference" (cpu) or "tensorrt_llm_pytorch" (GPU targets)."""
    return str(_get(manifest, "llm.engine", default="reference" if is_cpu(manifest) else "tensorrt_llm_pytorch"))
