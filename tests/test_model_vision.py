"""Vision path: pixel shuffle closed form, RADIO vs transformers' RadioModel, CPE, projector, VLM merge
and strict loading of checkpoint tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemovl_trt.checkpoint.config import VLMConfig, parse_vlm_config
from nemovl_trt.checkpoint.presets import preset_config
from nemovl_trt.checkpoint.weights import expected_tensors, init_weights
from nemovl_trt.model.projector import pixel_shuffle
from nemovl_trt.model.radio import RadioVisionModel
from nemovl_trt.model.random_init import random_init_
from nemovl_trt.model.vlm import NemotronVLM

VOCAB = 320
IMG_ID = VOCAB - 1


def tiny_cfg(**vision_overrides) -> VLMConfig:
    d = preset_config("tiny")
    d["llm_config"]["vocab_size"] = VOCAB
    d["img_context_token_id"] = IMG_ID
    d["vision_config"].update(vision_overrides)
    return parse_vlm_config(d)


@pytest.fixture(scope="module")
def cfg() -> VLMConfig:
    return tiny_cfg()


@pytest.fixture(scope="module")
def vlm(cfg) -> NemotronVLM:
    return random_init_(NemotronVLM(cfg), seed=1).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))


def closed_form_shuffle(x: torch.Tensor) -> torch.Tensor:
    """out[b,r,c,k] = x[b, 2r + k//(2C), 2c + (k//C)%2, k%C] (docs/model.md §4.8, r = 0.5, v2)."""
    b, h, w, c = x.shape
    out = torch.empty(b, h // 2, w // 2, 4 * c, dtype=x.dtype)
    for k in range(4 * c):
        dy, dx, ch = k // (2 * c), (k // c) % 2, k % c
        out[:, :, :, k] = x[:, dy::2, dx::2, ch]
    return out


@pytest.mark.parametrize("c", [3, 64])
def test_pixel_shuffle_v2_closed_form(c):
    x = torch.randn(2, 32, 32, c)
    got = pixel_shuffle(x, 0.5, "v2")
    assert got.shape == (2, 16, 16, 4 * c)
    assert torch.equal(got, closed_form_shuffle(x))
    # spot-check one element with explicit indices
    r, col, k = 5, 9, 3 * c + 1  # block 3 = (dy, dx) = (1, 1)
    assert got[1, r, col, k] == x[1, 2 * r + 1, 2 * col + 1, 1]


def test_pixel_shuffle_v1_transposes_grid():
    x = torch.randn(1, 8, 8, 2)
    v1, v2 = pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2")
    assert torch.equal(v1, v2.transpose(1, 2))
    with pytest.raises(ValueError, match="ps_version"):
        pixel_shuffle(x, 0.5, "v3")


def test_patchify_matches_conv2d(vlm):
    pg = vlm.vision_model.patch_generator
    x = torch.randn(1, 3, 64, 48)
    ours = pg.embedder(pg.patchify(x))  # [1,12,hid]
    p = pg.patch_size
    w = pg.embedder.weight.view(-1, 3, p, p)
    conv = F.conv2d(x, w, stride=p).flatten(2).transpose(1, 2)
    assert torch.allclose(ours, conv, atol=1e-5)


def _hf_radio(cfg: VLMConfig, ours: RadioVisionModel):
    from transformers.models.radio import RadioConfig, RadioModel

    v = cfg.vision
    hc = RadioConfig(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                     num_attention_heads=v.num_attention_heads, mlp_ratio=v.intermediate_size / v.hidden_size,
                     layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias, patch_size=v.patch_size,
                     max_img_size=v.cpe_max_size, num_cls_tokens=v.num_cls_tokens,
                     num_registers=v.num_registers, hidden_act="gelu")
    hf = RadioModel(hc).eval()
    hf.make_preprocessor_external()  # our preprocessor normalises; the conditioner is not applied
    sd, pre, hid = ours.state_dict(), "radio_model.model.", v.hidden_size
    new = {"embeddings.patch_projection.weight": sd[pre + "patch_generator.embedder.weight"],
           "embeddings.position_embedding": sd[pre + "patch_generator.pos_embed"],
           "embeddings.cls_register_token": sd[pre + "patch_generator.cls_token.token"],
           "summary_idxs": torch.arange(v.num_cls_tokens)}
    for i in range(v.num_hidden_layers):
        b, o = f"{pre}blocks.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            new[o + "norm1." + t] = sd[b + "norm1." + t]
            new[o + "norm2." + t] = sd[b + "norm2." + t]
            q, k, val = sd[b + "attn.qkv." + t].split(hid, dim=0)  # fused [q|k|v]
            new[o + "attention.q_proj." + t], new[o + "attention.k_proj." + t] = q, k
            new[o + "attention.v_proj." + t] = val
            new[o + "attention.o_proj." + t] = sd[b + "attn.proj." + t]
            new[o + "mlp.fc1." + t] = sd[b + "mlp.fc1." + t]
            new[o + "mlp.fc2." + t] = sd[b + "mlp.fc2." + t]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and all("layer_scale" in m for m in missing)  # LayerScale defaults to identity (1.0)
    return hf


@torch.inference_mode()
def test_radio_matches_transformers_radio(cfg, vlm, pixels):
    hf = _hf_radio(cfg, vlm.vision_model)
    ours = vlm.vision_model(pixels)
    ref = hf(pixels).features
    assert ours.shape == ref.shape == (2, cfg.patches_per_side ** 2, cfg.vision.hidden_size)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, diff
    assert ref.abs().max() > 0.5


def test_tile_position_embedding_is_the_cpe(cfg, vlm, pixels):
    enc = vlm.vision
    pos = enc.tile_position_embedding()
    g = cfg.patches_per_side
    assert pos.shape == (1, g * g, cfg.vision.hidden_size)
    with torch.inference_mode():
        assert torch.equal(enc(pixels[:1]), enc(pixels[:1], pos=pos))
    # CPE = bilinear resample of the G×G grid to g×g (align_corners False), no crop for square tiles
    grid = vlm.vision_model.patch_generator.pos_embed.detach().view(1, cfg.vision.pos_grid, cfg.vision.pos_grid, -1)
    ref = F.interpolate(grid.permute(0, 3, 1, 2), size=(g, g), mode="bilinear", align_corners=False)
    assert torch.allclose(pos, ref.flatten(2).transpose(1, 2), atol=1e-6)


def test_align_corners_switch_changes_cpe():
    a = random_init_(RadioVisionModel(tiny_cfg(pos_embed_align_corners=False).vision), seed=2)
    b = random_init_(RadioVisionModel(tiny_cfg(pos_embed_align_corners=True).vision), seed=2)
    pa, pb = a.tile_position_embedding(512), b.tile_position_embedding(512)
    assert pa.shape == pb.shape and (pa - pb).abs().max() > 1e-3


def test_non_square_grid_crops_then_resamples(vlm):
    pg = vlm.vision_model.patch_generator
    full = pg.position_embedding(32, 32).view(32, 32, -1)
    crop = pg.position_embedding(32, 20).view(32, 20, -1)
    assert torch.allclose(crop, full[:, :20], atol=1e-6)  # max side 32 → same resample, top-left crop


@torch.inference_mode()
def test_vision_encoder_output_and_projector(cfg, vlm, pixels):
    out = vlm.vision(pixels)
    assert out.shape == (2, cfg.tokens_per_tile, cfg.llm.hidden_size)
    # manual: features → closed-form shuffle → RMSNorm(fp32) → Linear → relu² → Linear
    feats = vlm.vision_model(pixels).view(2, cfg.patches_per_side, cfg.patches_per_side, -1)
    t = closed_form_shuffle(feats).reshape(2, cfg.tokens_per_tile, -1)
    t = vlm.mlp1[0].weight * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.llm.layer_norm_epsilon)
    t = F.relu(t @ vlm.mlp1[1].weight.T).square() @ vlm.mlp1[3].weight.T
    assert torch.allclose(out, t, atol=1e-4)
    # tiles are independent: encoding one tile alone gives the same rows
    assert torch.allclose(vlm.vision(pixels[1:]), out[1:], atol=1e-5)
    with pytest.raises(ValueError, match="expected pixels"):
        vlm.vision(pixels[:, :, :256])


def test_embed_replaces_image_context_rows_in_order(cfg, vlm):
    d = cfg.llm.hidden_size
    ids = [5, IMG_ID, IMG_ID, 7, IMG_ID, 9]
    mm = torch.arange(3 * d, dtype=torch.float32).view(3, d)
    emb = vlm.embed(ids, mm)
    plain = vlm.language_model.embed_tokens(torch.tensor(ids))
    assert emb.shape == (6, d)
    assert torch.equal(emb[1], mm[0]) and torch.equal(emb[2], mm[1]) and torch.equal(emb[4], mm[2])
    assert torch.equal(emb[[0, 3, 5]], plain[[0, 3, 5]])
    assert torch.equal(vlm.embed(ids, mm.view(1, 3, d)), emb)  # [N,P,D] is flattened
    with pytest.raises(ValueError, match="3 image-context tokens but 2"):
        vlm.embed(ids, mm[:2])
    with pytest.raises(ValueError, match="no image embeddings"):
        vlm.embed(ids, None)


def test_state_dict_names_equal_checkpoint_tensors(cfg):
    model = NemotronVLM(cfg)
    assert set(model.state_dict()) == set(expected_tensors(cfg))
    tensors = init_weights(cfg, seed=0)
    model.load_state_dict(tensors, strict=True)
    assert torch.equal(model.vision_model.patch_generator.pos_embed, tensors[
        "vision_model.radio_model.model.patch_generator.pos_embed"])


def test_from_checkpoint_meta_path_equals_plain(cfg, monkeypatch):
    import nemovl_trt.model.vlm as vlm_mod

    class Ckpt:
        config = cfg
        tensors = init_weights(cfg, seed=0)

    plain = NemotronVLM.from_checkpoint(Ckpt)
    monkeypatch.setattr(vlm_mod, "META_INIT_ABOVE_PARAMS", 0)  # force the meta-device construction
    meta = NemotronVLM.from_checkpoint(Ckpt)
    for (na, a), (nb, b) in zip(plain.state_dict().items(), meta.state_dict().items(), strict=True):
        assert na == nb and b.device.type == "cpu" and torch.equal(a, b), na


def test_from_checkpoint_strict_and_dtype(cfg):
    class Ckpt:  # the two fields from_checkpoint reads (the loader's Checkpoint has more)
        config = cfg
        tensors = init_weights(cfg, seed=0)

    fp32 = NemotronVLM.from_checkpoint(Ckpt)
    bf16 = NemotronVLM.from_checkpoint(Ckpt, dtype="bfloat16")
    assert fp32.language_model.dtype == torch.float32 and bf16.language_model.dtype == torch.bfloat16
    assert bf16.vision.mlp1[1].weight.dtype == torch.bfloat16
    ids = torch.arange(20)[None]
    with torch.inference_mode():
        a, b = fp32.language_model(ids), bf16.language_model(ids)
    assert (a - b).abs().max() < 0.05
    Ckpt.tensors = {k: v for k, v in Ckpt.tensors.items() if "summary_idxs" not in k}  # optional buffer
    assert NemotronVLM.from_checkpoint(Ckpt).vision_model.radio_model.summary_idxs.numel() > 0
    Ckpt.tensors = {k: v for k, v in Ckpt.tensors.items() if k != "mlp1.1.weight"}
    with pytest.raises(RuntimeError, match="mlp1.1.weight"):
        NemotronVLM.from_checkpoint(Ckpt)
