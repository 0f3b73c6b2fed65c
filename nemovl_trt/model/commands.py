"""`nemovl generate`: one prompt (text + optional images) through the PyTorch reference, printed as text.

    nemovl-build make-checkpoint --preset tiny --out /tmp/t
    nemovl generate --checkpoint /tmp/t --prompt "Describe the image." --image photo.jpg --max-tokens 32
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click


@dataclass(frozen=True)
class GenerateResult:
    """What one reference generation produced."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    num_tiles: list[int]


def generate_from_prompt(ckpt: Any, model: Any, prompt: str, images: Sequence[bytes] = (),
                         max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                         seed: int | None = None, max_num_tiles: int = 12) -> GenerateResult:
    """Chat-format `prompt` with the images placed before the text, tile and encode the images, and
    generate with the reference engine. `ckpt` is a loaded Checkpoint, `model` its NemotronVLM.
    Raises PreprocessError (bad image / parameters / context) or ValueError."""
    import torch

    from nemovl_trt.model.engine import generate
    from nemovl_trt.model.sampling import SamplingParams
    from nemovl_trt.preprocess.image import preprocess_image
    from nemovl_trt.preprocess.prompt import ImageInput, build_prompt

    cfg = ckpt.config
    tiles = [preprocess_image(data, max_num_tiles, cfg.norm_mean, cfg.norm_std, tile=cfg.force_image_size,
                              use_thumbnail=cfg.use_thumbnail) for data in images]
    content = [{"type": "image", "index": i} for i in range(len(images))] + [{"type": "text", "text": prompt}]
    built = build_prompt([{"role": "user", "content": content}], ckpt.tokenizer, cfg,
                         images=[ImageInput(num_tiles=t.num_tiles) for t in tiles], max_tokens=max_tokens)
    mm = None
    if tiles:
        with torch.inference_mode():
            per_image = [model.encode_images(torch.from_numpy(t.pixel_values)) for t in tiles]  # [n_i,P,D]
        mm = torch.cat([per_image[i].reshape(-1, per_image[i].shape[-1]) for i in built.image_order])
    params = SamplingParams(max_new_tokens=built.max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed)
    out = generate(model, built.input_ids, mm, params, eos_ids=ckpt.generation.eos_token_ids)
    text = ckpt.tokenizer.decode(out, skip_special_tokens=True)
    return GenerateResult(text=text, token_ids=out, prompt_ids=built.input_ids,
                          num_tiles=[t.num_tiles for t in tiles])


@click.command("generate")
@click.option("--checkpoint", "ckpt_dir", type=click.Path(path_type=Path), required=True,
              help="Checkpoint directory (e.g. from `nemovl-build make-checkpoint`).")
@click.option("--prompt", required=True, help="The user message text.")
@click.option("--image", "image_files", type=click.Path(path_type=Path), multiple=True,
              help="An image file to show the model (repeatable; placed before the text).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens to generate at most.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy; > 0 samples (seeded by --seed).")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (used when --temperature > 0).")
@click.option("--max-num-tiles", type=click.IntRange(min=1), default=12, show_default=True,
              help="Tiles per image at most (plus a thumbnail).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: the stored dtype).")
@click.option("--show-ids", is_flag=True, help="Also print the prompt length and the generated token ids.")
def generate(ckpt_dir: Path, prompt: str, image_files: tuple[Path, ...], max_tokens: int, temperature: float,
             top_p: float, top_k: int, seed: int | None, max_num_tiles: int, dtype: str | None,
             show_ids: bool) -> None:
    """Generate a reply to PROMPT (+ images) with the PyTorch reference model and print it."""
    from nemovl_trt.checkpoint.config import CheckpointError
    from nemovl_trt.checkpoint.loader import load_checkpoint
    from nemovl_trt.model.vlm import NemotronVLM

    images = []
    for f in image_files:
        if not f.is_file():
            raise click.ClickException(f"image file {f} does not exist.")
        images.append(f.read_bytes())
    try:
        ckpt = load_checkpoint(ckpt_dir)
        model = NemotronVLM.from_checkpoint(ckpt, dtype=dtype)
        res = generate_from_prompt(ckpt, model, prompt, images, max_tokens=max_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed, max_num_tiles=max_num_tiles)
    except (CheckpointError, ValueError) as e:  # PreprocessError is a ValueError
        raise click.ClickException(str(e)) from None
    click.echo(res.text)
    if show_ids:
        click.echo(f"[prompt tokens: {len(res.prompt_ids)}, tiles: {res.num_tiles}, "
                   f"generated: {res.token_ids}]", err=True)
