"""The reference model on the tiny checkpoint: strict load, deterministic round trip, `nemovl generate`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nemovl_trt.checkpoint.weights import expected_tensors
from nemovl_trt.model.commands import generate, generate_from_prompt
from nemovl_trt.model.vlm import NemotronVLM


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> NemotronVLM:
    return NemotronVLM.from_checkpoint(tiny_checkpoint)


def _png(w: int, h: int, seed: int) -> bytes:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_checkpoint_loads_strictly(tiny_checkpoint, model):
    cfg = tiny_checkpoint.config
    strict = NemotronVLM(cfg)
    strict.load_state_dict(tiny_checkpoint.tensors, strict=True)
    assert set(strict.state_dict()) == set(expected_tensors(cfg))
    for name in ("language_model.lm_head.weight", "mlp1.1.weight",
                 "vision_model.radio_model.model.patch_generator.cls_token.token"):
        assert torch.equal(model.state_dict()[name], tiny_checkpoint.tensors[name])


def test_round_trip_is_deterministic_and_image_sensitive(tiny_checkpoint, model):
    img_a, img_b = _png(300, 200, 0), _png(300, 200, 1)
    a = generate_from_prompt(tiny_checkpoint, model, "What is shown?", [img_a], max_tokens=6, max_num_tiles=1)
    again = generate_from_prompt(tiny_checkpoint, model, "What is shown?", [img_a], max_tokens=6, max_num_tiles=1)
    b = generate_from_prompt(tiny_checkpoint, model, "What is shown?", [img_b], max_tokens=6, max_num_tiles=1)
    cfg = tiny_checkpoint.config
    assert a.num_tiles == [1]  # max_num_tiles 1 → one tile, no thumbnail
    assert a.prompt_ids.count(cfg.img_context_token_id) == cfg.tokens_per_tile
    assert a.token_ids == again.token_ids and a.text == again.text
    assert 1 <= len(a.token_ids) <= 6
    assert a.token_ids != b.token_ids  # the image reaches the LLM
    s1 = generate_from_prompt(tiny_checkpoint, model, "Hi", [], max_tokens=6, temperature=1.0, seed=3)
    s2 = generate_from_prompt(tiny_checkpoint, model, "Hi", [], max_tokens=6, temperature=1.0, seed=3)
    assert s1.token_ids == s2.token_ids


def test_generate_command_prints_text(tiny_ckpt_dir, tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(_png(64, 64, 2))
    runner = CliRunner()
    args = ["--checkpoint", str(tiny_ckpt_dir), "--prompt", "Describe.", "--image", str(img), "--max-tokens", "5",
            "--max-num-tiles", "1"]
    res = runner.invoke(generate, args)
    assert res.exit_code == 0, res.output
    assert res.output.strip() or res.output == "\n"  # the decoded text (may be blank for special tokens)
    bad = runner.invoke(generate, ["--checkpoint", str(tiny_ckpt_dir), "--prompt", "x", "--image",
                                   str(tmp_path / "missing.png")])
    assert bad.exit_code == 1 and "does not exist" in bad.output and "Traceback" not in bad.output
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    bad = runner.invoke(generate, ["--checkpoint", str(tiny_ckpt_dir), "--prompt", "x", "--image", str(junk)])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and "Traceback" not in bad.output
