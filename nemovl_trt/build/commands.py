"""Click commands `nemovl-build plan` and `nemovl-build engines`. User errors: one line on stderr, exit 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from nemovl_trt.build.manifest import DEFAULT_MODEL_ID
from nemovl_trt.build.targets import TargetConfig, TargetError, load_target
from nemovl_trt.checkpoint.config import CheckpointError


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _target(name: str, llm_precision: str | None, tp: int | None = None, pp: int | None = None) -> TargetConfig:
    target = load_target(name)
    if llm_precision:
        target = target.with_llm_precision(llm_precision)
    return target if tp is None and pp is None else target.with_parallel(tp, pp)


_target_opt = click.option("--target", "-t", "target_name", required=True,
                           help="Target name (a100, l40s, h100, b200, cpu) or a path to a target YAML file.")
_ckpt_opt = click.option("--checkpoint", "-c", "checkpoint", required=True,
                         type=click.Path(file_okay=False, path_type=Path), help="Checkpoint directory.")
_prec_opt = click.option("--llm-precision", default=None,
                         help="Override the target's LLM precision with one of its llm_precision_options.")
# plain ints (not click.IntRange): the range/divisibility errors come from the target and plan checks, one line
_tp_opt = click.option("--tp", "tp", type=int, default=None,
                       help="Tensor-parallel size (1, 2, 4, 8): overrides the target's parallel.tensor_parallel.")
_pp_opt = click.option("--pp", "pp", type=int, default=None,
                       help="Pipeline-parallel size: overrides the target's parallel.pipeline_parallel.")


@click.command()
@click.option("--target", "-t", "target_name", default=None,
              help="Target name (a100, l40s, h100, b200, cpu) or a path to a target YAML file (not with --table).")
@_ckpt_opt
@_prec_opt
@_tp_opt
@_pp_opt
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--table", "as_table", is_flag=True,
              help="Print the markdown table of 1, 2, 4 and 8 GPUs per GPU target (docs/deploy.md).")
def plan(target_name: str | None, checkpoint: Path, llm_precision: str | None, tp: int | None, pp: int | None,
         as_json: bool, as_table: bool) -> None:
    """Memory plan of CHECKPOINT on a target and parallel layout: per-GPU weights, Mamba state, KV cache,
    activations, max batch per replica, decode and prefill rooflines, preprocessing cores, rank layout.
    Needs only config.json (works on `make-checkpoint --preset 12b-config`)."""
    from nemovl_trt.build.plan import PlanError, deploy_table, format_plan, plan_memory
    from nemovl_trt.checkpoint.config import load_vlm_config

    if as_table:
        if target_name or llm_precision or tp is not None or pp is not None or as_json:
            _fail("--table prints every GPU target at 1, 2, 4 and 8 GPUs: give it only --checkpoint.")
            return
        try:
            click.echo(deploy_table(load_vlm_config(checkpoint)), nl=False)
        except (TargetError, CheckpointError, PlanError) as e:
            _fail(str(e))
        return
    if not target_name:
        _fail("Missing option '--target' / '-t' (or use --table).")
        return
    try:
        target = _target(target_name, llm_precision, tp, pp)
        p = plan_memory(load_vlm_config(checkpoint), target)
    except (TargetError, CheckpointError, PlanError) as e:
        _fail(str(e))
        return
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(format_plan(p))
    if p.max_batch_size < 1:
        click.echo(f"warning: the weights and activations alone exceed target {target.name}'s memory budget.")


@click.command()
@_target_opt
@_ckpt_opt
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Engines directory to create/update.")
@_prec_opt
@_tp_opt
@_pp_opt
@click.option("--force", is_flag=True, help="Rebuild every step, even when up to date.")
@click.option("--model-id", default=DEFAULT_MODEL_ID, show_default=True, help="Model id served by the API.")
def engines(target_name: str, checkpoint: Path, out: Path, llm_precision: str | None, tp: int | None,
            pp: int | None, force: bool, model_id: str) -> None:
    """Build the engines dir for a target: vision ONNX (+ checked on ONNX Runtime), TensorRT plan on GPU
    targets, the LLM bundle (llm_api_options.yaml with the tensor/pipeline-parallel sizes), tokenizer and
    manifest.json (which records the world size). Up-to-date steps are skipped."""
    from nemovl_trt.build.engines import BuildError, build_engines
    from nemovl_trt.build.onnx_export import OnnxCheckError
    from nemovl_trt.build.plan import PlanError
    from nemovl_trt.build.trtllm_bundle import BundleError

    try:
        target = _target(target_name, llm_precision, tp, pp)
        report = build_engines(checkpoint, target, out, force=force, model_id=model_id, log=click.echo)
    except (TargetError, CheckpointError, PlanError, BuildError, OnnxCheckError, BundleError) as e:
        _fail(str(e))
        return
    if report.gpu_errors:
        _fail(report.gpu_errors[0])
        return
    if report.all_skipped:
        click.echo(f"all steps up to date in {out} (use --force to rebuild)")
    else:
        click.echo(f"engines for target {target.name} written to {out} in {report.seconds:.1f} s")
