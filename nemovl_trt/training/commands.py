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
@click.option("--dataset", type=click.Path(exists=True, path_type=Path), default=None,
              help="A benchmark file or folder (JSON, JSONL or parquet as the benchmark ships it) instead of "
                   "the synthetic questions; needs --format. See docs/eval.md.")
@click.option("--format", "fmt", type=click.Choice(["docvqa", "infovqa", "chartqa", "ai2d", "videomme"]),
              default=None, help="The --dataset's benchmark (its fields and its metric: ANLS for docvqa/infovqa, "
                                 "relaxed accuracy for chartqa, exact choice for ai2d/videomme).")
@click.option("--media-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of the dataset's images/videos [default: the dataset file's folder].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Ask only the first N questions of --dataset.")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True,
              help="max_tokens of each --dataset request.")
@click.option("--prompt", "prompt_style", type=click.Choice(["benchmark", "raw"]), default="benchmark",
              show_default=True, help="--dataset prompt: the usual instruction (short answer / lettered "
                                      "options) or the question alone.")
@click.option("--system", default="/no_think", show_default=True,
              help="System message of each --dataset request ('' for none).")
@click.option("--extra-body", default=None, metavar="JSON",
              help='Extra request fields for --dataset, e.g. \'{"media_io_kwargs": {"video": {"num_frames": 64}}}\'.')
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every --dataset answer and its score here (JSON Lines).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
def eval_cmd(server: str, n: int, seed: int | None, as_json: bool, urls: bool, max_num_tiles: int | None,
             video_pruning_rate: float | None, concurrency: int, model: str | None, api_key: str,
             dataset: Path | None, fmt: str | None, media_root: Path | None, limit: int | None, max_tokens: int,
             prompt_style: str, system: str, extra_body: str | None, predictions: Path | None,
             progress: bool | None) -> None:
    """Accuracy through the OpenAI API: N held-out synthetic questions per type (default), or a public
    benchmark file with --dataset FILE --format NAME, scored with that benchmark's metric."""
    if dataset is not None or fmt is not None:
        if dataset is None or fmt is None:
            raise click.UsageError("--dataset and --format go together.")
        _eval_dataset(server, dataset, fmt, media_root, limit, model, api_key, concurrency, max_tokens,
                      prompt_style, system, extra_body, max_num_tiles, video_pruning_rate, predictions, progress,
                      as_json)
        return
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


def _eval_dataset(server: str, dataset: Path, fmt: str, media_root: Path | None, limit: int | None,
                  model: str | None, api_key: str, concurrency: int, max_tokens: int, prompt_style: str,
                  system: str, extra_body: str | None, max_num_tiles: int | None,
                  video_pruning_rate: float | None, predictions: Path | None, progress: bool | None,
                  as_json: bool) -> None:
    from nemovl_trt.evaluation.formats import DatasetError, load_dataset
    from nemovl_trt.evaluation.runner import EndpointError, evaluate_items

    extra: dict = {}
    if extra_body:
        try:
            extra = json.loads(extra_body)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"not JSON: {e.msg}", param_hint="--extra-body") from None
        if not isinstance(extra, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--extra-body")
    if max_num_tiles is not None:
        extra.setdefault("mm_processor_kwargs", {})["max_num_tiles"] = max_num_tiles
    if video_pruning_rate is not None:
        extra["video_pruning_rate"] = video_pruning_rate
    try:
        items = load_dataset(dataset, fmt, media_root=media_root, limit=limit)
        result = evaluate_items(items, server, model=model, api_key=None if api_key == "none" else api_key,
                                concurrency=concurrency, max_tokens=max_tokens, prompt_style=prompt_style,
                                system=system or None, extra_body=extra or None, progress=progress)
    except (DatasetError, EndpointError) as e:
        raise click.ClickException(str(e)) from None
    if predictions is not None:
        result.write_predictions(predictions)
    click.echo(json.dumps(result.to_json()) if as_json else result.table())


def _error_message(e: object) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", e))
