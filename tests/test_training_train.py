"""Training: the fused ViT attention equals the reference, a few steps are deterministic and lower the
loss, the video path's prompt matches its EVS-pruned embeddings, and the committed trained checkpoint
is in the exact `make-checkpoint --preset tiny` format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemovl_trt.checkpoint.loader import load_checkpoint
from nemovl_trt.checkpoint.synth import write_checkpoint
from nemovl_trt.checkpoint.weights import expected_tensors
from nemovl_trt.model.vlm import NemotronVLM
from nemovl_trt.training.train import (
    DEFAULT_SEED,
    RoundPrefetcher,
    TrainConfig,
    Trainer,
    fused_attention,
    lr_at,
    set_determinism,
)

TRAINED = Path(__file__).resolve().parent.parent / "data" / "tiny-trained"
SHORT = TrainConfig(steps=4, lr=3e-3, warmup_steps=1, threads=1, media=("shape", "count"), log_every=100)


def test_fused_attention_matches_the_reference(tiny_checkpoint) -> None:
    model = NemotronVLM.from_checkpoint(tiny_checkpoint, "float32")
    gen = torch.Generator().manual_seed(0)
    side = tiny_checkpoint.config.force_image_size
    pixels = torch.randn(2, 3, side, side, generator=gen)
    with torch.no_grad():
        ref = model.vision(pixels)
        with fused_attention(model):
            fast = model.vision(pixels)
        again = model.vision(pixels)  # the patch is undone on exit
    assert fast.shape == (2, tiny_checkpoint.config.tokens_per_tile, tiny_checkpoint.config.llm.hidden_size)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, ref)


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.05)
    assert lr_at(50, cfg) < lr_at(20, cfg)


def _short_run(base: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    set_determinism(SHORT.seed, SHORT.threads)
    trainer = Trainer(base, SHORT)
    losses: list[float] = []
    with fused_attention(trainer.model):
        for step in range(SHORT.steps):
            losses.append(trainer.step(step)[0])
    return losses, trainer.trained_tensors()


def test_short_training_is_deterministic_and_lowers_the_loss(tiny_ckpt_dir: Path) -> None:
    losses_a, tensors_a = _short_run(tiny_ckpt_dir)
    losses_b, tensors_b = _short_run(tiny_ckpt_dir)
    assert losses_a == losses_b
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert sum(losses_a[-2:]) / 2 < losses_a[0] - 0.5, losses_a
    original = load_checkpoint(tiny_ckpt_dir).tensors
    changed = [k for k in tensors_a if not torch.equal(tensors_a[k], original[k])]
    assert "mlp1.1.weight" in changed and "language_model.lm_head.weight" in changed
    # the ViT is frozen: only its residual outputs differ from the random init (the init scaling)
    vit_changed = {k for k in changed if k.startswith("vision_model.")}
    assert vit_changed and all(k.endswith(("attn.proj.weight", "mlp.fc2.weight")) for k in vit_changed)


def test_video_round_prompt_matches_the_pruned_embeddings(tiny_ckpt_dir: Path) -> None:
    set_determinism(0, 1)
    cfg = TrainConfig(media=("video",), threads=1)
    trainer = Trainer(tiny_ckpt_dir, cfg)
    vcfg = trainer.vcfg
    with torch.no_grad(), fused_attention(trainer.model):
        media, examples = trainer.build_round(0)
    rows = media[0]
    frames, per_tile = 8, vcfg.tokens_per_tile
    expected = max(per_tile, int(frames * per_tile * (1 - vcfg.video_pruning_rate)))
    assert rows.shape == (expected, vcfg.llm.hidden_size)
    assert [e.qtype for e in examples] == ["video_first", "video_last"]
    for ex in examples:
        assert ex.prompt_ids.count(vcfg.img_context_token_id) == expected
        assert ex.answer_ids[-1] == trainer.tok.special["<SPECIAL_12>"]
        text = trainer.tok.decode(ex.prompt_ids)
        assert "This is a video:\nFrame 1 sampled at 0.00 seconds: " in text
        assert "Frame 8 sampled at 3.50 seconds: " in text
        assert text.endswith("<SPECIAL_11>Assistant\n<think></think>")


def test_shared_prefix_forward_equals_full_sequences(tiny_ckpt_dir: Path) -> None:
    """The step runs each media's prefix once and forks it per question; the hidden states that predict
    the answers must equal running every question's full sequence through the reference model."""
    set_determinism(0, 1)
    trainer = Trainer(tiny_ckpt_dir, TrainConfig(media=("shape", "count", "video"), threads=1))
    rows, examples = trainer.build_round(0)
    assert [e.qtype for e in examples] == ["color", "shape", "count", "video_first", "video_last"]
    lm = trainer.model.language_model
    with torch.no_grad():
        with fused_attention(trainer.model):
            fast = trainer.answer_hidden(rows, examples)
        ref = []
        for ex in examples:
            ids = ex.prompt_ids + ex.answer_ids
            h = lm.hidden_states(trainer.model.embed(ids, rows[ex.media])[None], [lm.new_state()])
            ref.append(h[0, len(ex.prompt_ids) - 1:len(ids) - 1])
    assert fast.shape == (sum(len(e.answer_ids) for e in examples), lm.lm_head.in_features)
    assert torch.allclose(fast, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_background_worker_prepares_the_same_round(tiny_ckpt_dir: Path) -> None:
    set_determinism(0, 1)
    cfg = TrainConfig(media=("count", "video"), threads=1)
    trainer = Trainer(tiny_ckpt_dir, cfg)
    here = trainer.vision.prepare(3, cfg.seed, cfg.media)
    prefetch = RoundPrefetcher(trainer.vision, cfg.seed, cfg.media)
    try:
        there = prefetch.get(3, 5)
    finally:
        prefetch.close()
    assert [m.qas for m in there] == [m.qas for m in here]
    assert [m.timestamps for m in there] == [m.timestamps for m in here] and here[1].timestamps is not None
    assert all(torch.equal(a.features, b.features) for a, b in zip(here, there, strict=True))
    assert here[0].features.shape == (1, trainer.vcfg.tokens_per_tile, trainer.vcfg.shuffled_dim)


@pytest.mark.skipif(not (TRAINED / "config.json").is_file(), reason="data/tiny-trained is not committed yet")
def test_committed_checkpoint_has_the_tiny_preset_format(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    write_checkpoint(ref, "tiny", seed=DEFAULT_SEED)
    ref_files = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in TRAINED.iterdir()) == ref_files
    for name in ref_files:
        if name.endswith(".json") or name.endswith(".jinja"):
            assert (TRAINED / name).read_bytes() == (ref / name).read_bytes(), name
    trained = load_checkpoint(TRAINED)
    random_init = load_checkpoint(ref)
    shapes = expected_tensors(trained.config)
    assert list(trained.tensors) == list(random_init.tensors)
    for k, shape in shapes.items():
        t = trained.tensors[k]
        assert tuple(t.shape) == shape and t.dtype == random_init.tensors[k].dtype, k
        assert torch.isfinite(t.float()).all(), k
    assert not torch.equal(trained.tensors["mlp1.1.weight"], random_init.tensors["mlp1.1.weight"])
    total = sum(p.stat().st_size for p in TRAINED.iterdir())
    assert total < 16 * 1024 * 1024
    assert json.loads((TRAINED / "config.json").read_text())["video_pruning_rate"] == \
        trained.config.video_pruning_rate
