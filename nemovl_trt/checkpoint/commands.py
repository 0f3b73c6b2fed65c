"""`nemovl-build make-checkpoint`: write a tiny checkpoint (or the 12B's config files) in the exact HF format."""

from __future__ import annotations

import time
from pathlib import Path

import click

from nemovl_trt.checkpoint.config import CheckpointError
from nemovl_trt.checkpoint.presets import PRESETS


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        size /= 1024
    return f"{nbytes} B"


@click.command("make-checkpoint")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="tiny: random weights + a locally trained tokenizer; 12b-config: the real config files only.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write (created; must be empty unless --force).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights and tokenizer corpus.")
@click.option("--shard-size", "shard_bytes", type=click.IntRange(min=1), default=None,
              help="Split the weights into safetensors shards of at most this many bytes (+ index).")
@click.option("--force", is_flag=True, help="Overwrite the checkpoint files of an existing directory.")
def make_checkpoint(preset: str, out_dir: Path, seed: int, shard_bytes: int | None, force: bool) -> None:
    """Write a NemotronH_Nano_VL_V2 checkpoint of PRESET into --out."""
    from nemovl_trt.checkpoint.synth import write_checkpoint  # torch import only when the command runs

    start = time.perf_counter()
    try:
        written = write_checkpoint(out_dir, preset, seed=seed, shard_bytes=shard_bytes, force=force)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    elapsed = time.perf_counter() - start
    params = f", {written.num_parameters:,} parameters" if written.num_parameters else ""
    click.echo(f"wrote {preset} checkpoint (seed {seed}) to {written.path}: {len(written.files)} files, "
               f"{_human(written.total_bytes)}{params}, in {elapsed:.2f} s")
    for name in written.files:
        click.echo(f"  {name}  {_human((written.path / name).stat().st_size)}")
