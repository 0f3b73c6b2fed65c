"""`nemovl-build train-tiny` (train the tiny checkpoint) and `nemovl eval` (accuracy of a served model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

DEFAULT_TRAIN_SEED = 0


@click.command("train-tiny")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint directory to write (the make-checkpoint --preset tiny format).")
@click.option("--seed", default=DEFAULT_TRAIN_SEED, show_default=True, type=int,
              help="Seed of the weights' initialisation and of the training data.")
@click.option("--steps", default=None, type=click.IntRange(1), help="Optimizer steps (default: the recipe's).")
@click.option("--minutes", default=None, type=click.FloatRange(0, min_open=True),
              help="Stop early when this wall-clock budget is spent (the result then depends on the machine).")
@click.option("--force", is_flag=True, help="Overwrite the checkpoint files in a non-empty --out.")
def train_tiny(out: Path, seed: int, steps: int | None, minutes: float | None, force: bool) -> None:
    """Train the tiny checkpoint on the synthetic visual-QA tasks (colour, shape, count, read, detail,
    video first/last colour) on CPU, deterministically for a seed."""
    from nemovl_trt.checkpoint.config import CheckpointError
    from nemovl_trt.training.train import DEFAULT_STEPS, TrainConfig, train

    cfg = TrainConfig(steps=steps or DEFAULT_STEPS, seed=seed, minutes=minutes)
    click.echo(f"training {cfg.steps} steps (seed {seed}, {cfg.threads} threads) into {out} ...", err=True)
    try:
        report = train(out, cfg, log=lambda s: click.echo(s, err=True), force=force)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    click.echo(f"trained {report.steps} steps in {report.seconds / 60:.1f} min; checkpoint {out} "
               f"({size / 1e6:.1f} MB)")


@click.command("eval")
@click.option("--server", default="http://127.0.0.1:8000", show_default=True,
              help="Address of the OpenAI-compatible server (/v1 is appended when missing).")
@click.option("--n", "n", default=70, show_default=True, type=click.IntRange(1),
              help="Questions in total, spread evenly over the question types.")
@click.option("--seed", default=None, type=int, help="Seed of the held-out questions [default: 1].")
@click.option("--json", "as_json", is_flag=True, help='Print {"per_type": {type: accuracy}, "overall": x}.')
@click.option("--urls", is_flag=True,
              help="Send images as http URLs served on 127.0.0.1 (start the server with --allow-media-host "
                   "127.0.0.1) instead of base64 data URLs.")
@click.option("--max-num-tiles", default=None, type=click.IntRange(1, 12),
              help="Send mm_processor_kwargs.max_num_tiles with every image question.")
@click.option("--video-pruning-rate", default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Send video_pruning_rate (EVS) with every video question [default: the rate the tiny "
                   "checkpoint was trained with, 0.7].")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Requests in flight at once.")
@click.option("--model", default=None, help="Model id [default: the server's first model].")
@click.option("--api-key", envvar="NEMOVL_API_KEY", default="none", show_default=False,
              help="Bearer key, if the server requires one (env NEMOVL_API_KEY).")
def eval_cmd(server: str, n: int, seed: int | None, as_json: bool, urls: bool, max_num_tiles: int | None,
             video_pruning_rate: float | None, concurrency: int, model: str | None, api_key: str) -> None:
    """Ask N held-out synthetic questions through the OpenAI API and print accuracy per question type."""
    try:
        import openai
    except ImportError:  # optional extra
        raise click.ClickException("`nemovl eval` needs openai: pip install 'nemovl-trt[client]'") from None

    from nemovl_trt.training.evaluate import DEFAULT_EVAL_SEED, evaluate

    def progress(done: int, total: int) -> None:
        if not as_json and sys.stderr.isatty():
            click.echo(f"\r{done}/{total} answered", nl=done == total, err=True)

    try:
        result = evaluate(server, n, seed=DEFAULT_EVAL_SEED if seed is None else seed, urls=urls,
                          max_num_tiles=max_num_tiles, video_pruning_rate=video_pruning_rate,
                          concurrency=concurrency, model=model, api_key=api_key, progress=progress)
    except openai.APIConnectionError:
        raise click.ClickException(f"cannot reach the server at {server}; is `nemovl serve` running?") from None
    except openai.APIStatusError as e:
        raise click.ClickException(f"the server answered HTTP {e.status_code}: {_error_message(e)}") from None
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        click.echo(result.table())


def _error_message(e: object) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", e))
