"""Write deploy/helm/nemovl-trt/values-<target>.yaml for every build target in build_configs/.

    .venv/bin/python deploy/helm/gen_values.py           # (re)write the files
    .venv/bin/python deploy/helm/gen_values.py --check   # exit 1 if a file is stale (tests run this)

What comes from the target file: GPUs per pod = parallel.tensor_parallel × parallel.pipeline_parallel
(1 when the file has no `parallel:` section; 0 on the cpu target). What is derived from the memory plan
(nemovl_trt/build/plan.py) on the real 12B config: host RAM (the bf16 checkpoint is read into host memory
while the engines load) and the model-cache volume (checkpoint + engines). The remaining sizes are the
`PodSizing` constants below; they are engineering allowances, not measurements (no GPU here).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "nemovl-trt"
TARGETS_DIR = ROOT / "build_configs"
TINY_CHECKPOINT = ROOT / "data" / "tiny-trained"
IMAGE_TINY_CHECKPOINT = "/opt/nemovl-trt/data/tiny-trained"  # where Dockerfile.cpu copies it
GIB = 2**30


@dataclass(frozen=True)
class PodSizing:
    """Allowances per pod (GiB, cores, seconds). Why each: see the comments."""

    host_base_gib: int = 16  # tritonserver + Python-backend stubs + frontend + preprocessing workers
    host_per_gpu_gib: int = 4  # one TensorRT-LLM worker process per rank (CUDA context, pinned buffers)
    shm_base_gib: int = 2  # Python-backend tensors (image tiles, embeddings) between the models
    shm_per_gpu_gib: int = 1  # NCCL's intra-node buffers between the ranks of one pod
    cpu_per_gpu: int = 8  # image decode / tiling / tokenization feeding one GPU
    volume_headroom: float = 2.0  # room to rebuild the engines next to the old ones (`--force`)
    volume_round_gib: int = 10
    gpu_startup_s: int = 3600  # first start on an empty volume: ONNX export, TensorRT plan, LLM load
    gpu_checkpoint_wait_s: int = 1800  # of that window, how long the first pod waits for the checkpoint copy
    # cpu target: the tiny checkpoint on the PyTorch reference engine + ONNX Runtime
    cpu_host_gib: int = 4
    cpu_shm_gib: int = 1
    cpu_cores: int = 2
    cpu_volume_gib: int = 2
    cpu_startup_s: int = 300
    probe_period_s: int = 10


SIZING = PodSizing()


def target_names() -> list[str]:
    """Build target names, from build_configs/*.yaml."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def raw_target(name: str) -> dict[str, Any]:
    """build_configs/<name>.yaml as a mapping (read directly so a new section needs no code here)."""
    return yaml.safe_load((TARGETS_DIR / f"{name}.yaml").read_text())


def parallel_of(raw: dict[str, Any]) -> tuple[int, int]:
    """(tensor_parallel, pipeline_parallel) of a target mapping; (1, 1) without a `parallel:` section."""
    par = raw.get("parallel") or {}
    return int(par.get("tensor_parallel", 1)), int(par.get("pipeline_parallel", 1))


def gpus_per_pod(raw: dict[str, Any]) -> int:
    """nvidia.com/gpu one pod requests: tp × pp on GPU targets, 0 on the cpu target (arch none)."""
    if raw.get("arch") == "none":
        return 0
    tp, pp = parallel_of(raw)
    return tp * pp


def _ceil_to(gib: float, step: int) -> int:
    return int(math.ceil(gib / step) * step)


def pod_values(name: str) -> dict[str, Any]:
    """The values that differ per target (the chart's values.yaml holds the rest)."""
    from nemovl_trt.build.plan import plan_memory
    from nemovl_trt.build.targets import PRECISION_BYTES, load_target
    from nemovl_trt.checkpoint.config import load_vlm_config, parse_vlm_config
    from nemovl_trt.checkpoint.presets import preset_config

    raw = raw_target(name)
    target = load_target(name)
    tp, pp = parallel_of(raw)
    gpus = gpus_per_pod(raw)
    s = SIZING
    if gpus == 0:
        tiny = plan_memory(load_vlm_config(TINY_CHECKPOINT), target)
        host = max(s.cpu_host_gib, math.ceil(tiny.weights_bytes / GIB))
        shm, cores, volume = s.cpu_shm_gib, s.cpu_cores, s.cpu_volume_gib
        startup_s, image_tag, checkpoint, tolerations = s.cpu_startup_s, "cpu", IMAGE_TINY_CHECKPOINT, []
        wait_s = 0  # the tiny checkpoint is in the image
    else:
        cfg = parse_vlm_config(preset_config("12b-config"))
        served = plan_memory(cfg, target)
        # the HF checkpoint on the volume holds every parameter in bf16
        ckpt_gib = (served.llm_params + served.vision_params) * PRECISION_BYTES["bf16"] / GIB
        host = math.ceil(ckpt_gib) + s.host_base_gib + s.host_per_gpu_gib * gpus
        shm = s.shm_base_gib + s.shm_per_gpu_gib * gpus
        cores = s.cpu_per_gpu * gpus
        volume = _ceil_to((ckpt_gib + served.weights_bytes / GIB) * s.volume_headroom, s.volume_round_gib)
        startup_s, image_tag, checkpoint = s.gpu_startup_s, "gpu", "/workspace/checkpoint"
        wait_s = s.gpu_checkpoint_wait_s
        tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "target": name,
        "image": {"tag": image_tag},
        "parallel": {"tensorParallel": tp if gpus else 1, "pipelineParallel": pp if gpus else 1},
        "gpus": gpus,
        # memory limit = host RAM + the memory-backed /dev/shm (it counts against the limit)
        "resources": {"cpu": str(cores), "memory": f"{host + shm}Gi"},
        "shm": {"sizeLimit": f"{shm}Gi"},
        "engines": {"build": True, "checkpoint": checkpoint, "waitForCheckpointSeconds": wait_s},
        "persistence": {"size": f"{volume}Gi"},
        "probes": {"startup": {"periodSeconds": s.probe_period_s,
                               "failureThreshold": startup_s // s.probe_period_s}},
        "tolerations": tolerations,
    }


def render(name: str) -> str:
    """values-<name>.yaml's text."""
    header = (f"# GENERATED by deploy/helm/gen_values.py from build_configs/{name}.yaml: edit that file or the\n"
              f"# generator, then rerun it. Use: helm install vl deploy/helm/nemovl-trt -f {values_path(name).relative_to(ROOT)}\n")
    return header + yaml.safe_dump(pod_values(name), sort_keys=False, default_flow_style=False)


def doc_table() -> str:
    """The per-target values table of docs/deploy.md (§3 "Values per target"), from the generated values."""
    rows = ["| target | GPU | LLM precision | tp × pp = `gpus` | `resources.cpu` | `resources.memory` (request = limit) "
            "| `shm.sizeLimit` | `persistence.size` | startup window |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in target_names():
        raw, v = raw_target(name), pod_values(name)
        par = v["parallel"]
        tpp = f"{par['tensorParallel']} × {par['pipelineParallel']} = {v['gpus']}" if v["gpus"] else "0 (cpu)"
        startup = v["probes"]["startup"]
        rows.append(f"| {name} | {raw.get('description', '')} | {raw['llm_precision']} | {tpp} "
                    f"| {v['resources']['cpu']} | {v['resources']['memory']} | {v['shm']['sizeLimit']} "
                    f"| {v['persistence']['size']} | {startup['periodSeconds'] * startup['failureThreshold']} s |")
    return "\n".join(rows) + "\n"


def values_path(name: str) -> Path:
    return CHART / f"values-{name}.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a values file is missing or stale")
    ap.add_argument("--table", action="store_true", help="print docs/deploy.md's per-target values table")
    args = ap.parse_args(argv)
    if args.table:
        print(doc_table(), end="")
        return 0
    stale = []
    for name in target_names():
        text, path = render(name), values_path(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.relative_to(ROOT).as_posix())
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale: {', '.join(stale)} (run: python deploy/helm/gen_values.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
