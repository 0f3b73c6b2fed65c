"""Tensor names/shapes of docs/model.md §4.11/§6.5 and the random initialisation of the tiny checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from nemovl_trt.checkpoint.config import parse_vlm_config
from nemovl_trt.checkpoint.presets import preset_config
from nemovl_trt.checkpoint.weights import expected_tensors, init_weights, integer_tensors

V = "vision_model.radio_model."
B = "language_model.backbone."


@pytest.fixture(scope="module")
def cfg12():
    return parse_vlm_config(preset_config("12b-config"))


@pytest.fixture(scope="module")
def tiny_cfg(tiny_checkpoint):
    return tiny_checkpoint.config


def test_12b_shapes_match_spec(cfg12):
    e = expected_tensors(cfg12)
    # docs/model.md §4 (vision), numbers as written there
    assert e[V + "model.patch_generator.embedder.weight"] == (1280, 768)
    assert e[V + "model.patch_generator.pos_embed"] == (1, 16384, 1280)
    assert e[V + "model.patch_generator.cls_token.token"] == (8, 1280)
    assert e[V + "model.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert e[V + "model.blocks.31.attn.qkv.bias"] == (3840,)
    assert e[V + "model.blocks.0.mlp.fc1.weight"] == (5120, 1280)
    assert e[V + "model.blocks.0.mlp.fc2.weight"] == (1280, 5120)
    assert e[V + "input_conditioner.norm_mean"] == (3, 1, 1)
    assert V + "model.blocks.32.norm1.weight" not in e
    assert (e["mlp1.0.weight"], e["mlp1.1.weight"], e["mlp1.3.weight"]) == ((5120,), (20480, 5120), (5120, 20480))
    # docs/model.md §6 (LLM); layer 0 is M, 1 is -, 7 is *
    assert e[B + "layers.0.mixer.in_proj.weight"] == (22656, 5120)
    assert e[B + "layers.0.mixer.conv1d.weight"] == (12288, 1, 4)
    assert e[B + "layers.0.mixer.conv1d.bias"] == (12288,)
    assert e[B + "layers.0.mixer.dt_bias"] == e[B + "layers.0.mixer.A_log"] == e[B + "layers.0.mixer.D"] == (128,)
    assert e[B + "layers.0.mixer.norm.weight"] == (10240,)
    assert e[B + "layers.0.mixer.out_proj.weight"] == (5120, 10240)
    assert e[B + "layers.1.mixer.up_proj.weight"] == (20480, 5120)
    assert e[B + "layers.1.mixer.down_proj.weight"] == (5120, 20480)
    assert e[B + "layers.7.mixer.q_proj.weight"] == (5120, 5120)
    assert e[B + "layers.7.mixer.k_proj.weight"] == e[B + "layers.7.mixer.v_proj.weight"] == (1024, 5120)
    assert e[B + "layers.7.mixer.o_proj.weight"] == (5120, 5120)
    assert e[B + "layers.61.norm.weight"] == (5120,) and B + "layers.62.norm.weight" not in e
    assert e[B + "embeddings.weight"] == e["language_model.lm_head.weight"] == (131200, 5120)
    assert e[B + "norm_f.weight"] == (5120,)
    # counts: vision 3 + 32·12 + 3 buffers, projector 3, LLM 1 + 62 norms + 28·8 + 6·4 + 28·2 + 2
    assert len(e) == (3 + 32 * 12 + 3) + 3 + (1 + 62 + 28 * 8 + 6 * 4 + 28 * 2 + 2)
    n = sum(math.prod(s) for s in e.values())
    assert 12.0e9 < n < 13.5e9  # "12B" LLM + a ~0.6B ViT + projector
    assert integer_tensors(cfg12) == {V + "summary_idxs"}


def test_no_bias_tensors_when_config_says_so(cfg12):
    e = expected_tensors(cfg12)
    assert not [k for k in e if k.startswith("language_model.") and k.endswith(".bias") and "conv1d" not in k]


def test_tiny_shapes_come_from_its_config(tiny_checkpoint, tiny_cfg):
    e = expected_tensors(tiny_cfg)
    assert e[V + "model.patch_generator.embedder.weight"] == (64, 3 * 16 * 16)
    assert e[V + "model.patch_generator.pos_embed"] == (1, (1024 // 16) ** 2, 64)
    assert e[V + "model.patch_generator.cls_token.token"] == (4, 64)  # 2 teachers + 2 registers (multiple 4)
    assert e["mlp1.1.weight"] == (384, 256) and e["mlp1.3.weight"] == (128, 384)
    # pattern "M-M*-M*-": d_inner 8·16 = 128; conv 128 + 2·2·16 = 192; in_proj 128 + 192 + 8 = 328
    assert e[B + "layers.0.mixer.in_proj.weight"] == (328, 128)
    assert e[B + "layers.0.mixer.conv1d.weight"] == (192, 1, 4)
    assert e[B + "layers.3.mixer.k_proj.weight"] == (64, 128)
    assert e[B + "embeddings.weight"] == (tiny_checkpoint.tokenizer.vocab_size, 128)
    assert set(tiny_checkpoint.tensors) == set(e)


def test_init_is_deterministic_and_seed_dependent(tiny_cfg):
    a, b, c = init_weights(tiny_cfg, 0), init_weights(tiny_cfg, 0), init_weights(tiny_cfg, 1)
    assert list(a) == list(expected_tensors(tiny_cfg))
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    # everything random differs; the constants (D, norm mean/std, summary_idxs) do not
    assert len(differ) == len(a) - 3 - sum(1 for k in a if k.endswith(".D"))


def test_init_scales(tiny_cfg):
    w = init_weights(tiny_cfg, 0)
    lo, hi = tiny_cfg.raw["llm_config"]["time_step_min"], tiny_cfg.raw["llm_config"]["time_step_max"]
    for k, t in w.items():
        if k.endswith("A_log"):
            assert (t.exp() >= 1).all() and (t.exp() <= 16).all()
        elif k.endswith("dt_bias"):
            dt = torch.nn.functional.softplus(t)
            assert (dt >= lo * 0.999).all() and (dt <= hi * 1.001).all()
        elif k.endswith(".D"):
            assert torch.equal(t, torch.ones_like(t))
    assert w[V + "summary_idxs"].dtype == torch.int64
    assert w[V + "input_conditioner.norm_std"].flatten().tolist() == pytest.approx(list(tiny_cfg.norm_std))
    norm = w[B + "norm_f.weight"]
    assert abs(norm.mean().item() - 1) < 0.02 and 0.02 < norm.std().item() < 0.1
    q = w[B + "layers.3.mixer.q_proj.weight"]  # std 1/sqrt(fan_in)
    assert q.std().item() == pytest.approx(1 / math.sqrt(q.shape[1]), rel=0.1)
    assert w[B + "embeddings.weight"].std().item() == pytest.approx(1.0, rel=0.05)


def test_random_llm_output_depends_on_the_prompt(tiny_checkpoint):
    """A degenerate init (e.g. N(0, 0.02) everywhere) makes greedy output identical for every prompt.
    Oracle: transformers' NemotronH with the checkpoint's LLM weights."""
    nh = pytest.importorskip("transformers.models.nemotron_h")
    llm = {k: v for k, v in tiny_checkpoint.config.raw["llm_config"].items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    model = nh.NemotronHForCausalLM(nh.NemotronHConfig(**llm)).eval()
    pre = "language_model."
    sd = {("model." + k[len(pre + "backbone."):] if k.startswith(pre + "backbone.") else k[len(pre):]): v
          for k, v in tiny_checkpoint.tensors.items() if k.startswith(pre)}
    model.load_state_dict(sd, strict=True)
    tok = tiny_checkpoint.tokenizer
    nexts = []
    with torch.no_grad():
        for p in ("How many red squares are there?", "Which shape is blue?", "Describe the video frame.", "Hi"):
            ids = torch.tensor([tok.encode(tok.render([{"role": "user", "content": p}]))])
            logits = model(ids).logits[0, -1]
            assert logits.std().item() > 0.5
            nexts.append(int(logits.argmax()))
    assert len(set(nexts)) >= 3
