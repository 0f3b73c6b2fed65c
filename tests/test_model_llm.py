"""Nemotron-H reference LM: SSD scan vs recurrence, cached vs uncached, parity with transformers."""

from __future__ import annotations

import math

import pytest
import torch

from nemovl_trt.checkpoint.config import LLMConfig, VLMConfig, parse_vlm_config
from nemovl_trt.checkpoint.presets import preset_config
from nemovl_trt.model.mamba2 import chunked_ssd_scan, naive_ssd_scan, ssm_step
from nemovl_trt.model.nemotron_h import NemotronHLM
from nemovl_trt.model.random_init import random_init_

VOCAB = 320


def tiny_cfg(**llm_overrides) -> VLMConfig:
    d = preset_config("tiny")
    d["llm_config"]["vocab_size"] = VOCAB
    d["llm_config"].update(llm_overrides)
    d["img_context_token_id"] = VOCAB - 1
    return parse_vlm_config(d)


@pytest.fixture(scope="module")
def llm_cfg() -> LLMConfig:
    return tiny_cfg().llm


@pytest.fixture(scope="module")
def lm(llm_cfg) -> NemotronHLM:
    return random_init_(NemotronHLM(llm_cfg), seed=3).eval()


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _ssm_inputs(b, seq, nh, hd, ng, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seq, nh, hd, generator=g)
    dt = torch.rand(b, seq, nh, generator=g) * 0.5 + 0.01
    A = -(torch.rand(nh, generator=g) * 3 + 0.1)
    B = torch.randn(b, seq, ng, n, generator=g)
    C = torch.randn(b, seq, ng, n, generator=g)
    D = torch.randn(nh, generator=g)
    s0 = torch.randn(b, nh, hd, n, generator=g)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("seq", [1, 5, 16, 17, 40, 63])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_naive_recurrence(seq, with_state):
    x, dt, A, B, C, D, s0 = _ssm_inputs(2, seq, 8, 4, 2, 6, seed=seq)
    init = s0 if with_state else None
    y_ref, s_ref = naive_ssd_scan(x, dt, A, B, C, D, init)
    y, s = chunked_ssd_scan(x, dt, A, B, C, D, chunk_size=16, initial_state=init)
    assert y.shape == (2, seq, 8, 4) and s.shape == (2, 8, 4, 6)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5), (y - y_ref).abs().max()
    assert torch.allclose(s, s_ref, atol=1e-5, rtol=1e-5), (s - s_ref).abs().max()


def test_chunked_scan_is_chunk_size_independent():
    x, dt, A, B, C, D, s0 = _ssm_inputs(1, 50, 4, 3, 1, 5, seed=9)
    y8, s8 = chunked_ssd_scan(x, dt, A, B, C, D, 8, s0)
    y64, s64 = chunked_ssd_scan(x, dt, A, B, C, D, 64, s0)
    assert torch.allclose(y8, y64, atol=1e-5) and torch.allclose(s8, s64, atol=1e-5)


def test_ssm_step_matches_formula():
    g = torch.Generator().manual_seed(1)
    S = torch.randn(1, 2, 3, 4, generator=g)
    x, B, C = torch.randn(1, 2, 3, generator=g), torch.randn(1, 2, 4, generator=g), torch.randn(1, 2, 4, generator=g)
    dt, A, D = torch.tensor([[0.3, 0.7]]), torch.tensor([-1.0, -2.0]), torch.tensor([0.5, -1.5])
    S2, y = ssm_step(S, x, dt, A, B, C, D)
    h, p, n = 1, 2, 3
    expect_s = math.exp(0.7 * -2.0) * S[0, h, p, n] + 0.7 * x[0, h, p] * B[0, h, n]
    assert S2[0, h, p, n].item() == pytest.approx(expect_s.item(), abs=1e-6)
    expect_y = (S2[0, h, p] * C[0, h]).sum() + D[h] * x[0, h, p]
    assert y[0, h, p].item() == pytest.approx(expect_y.item(), abs=1e-5)


@torch.inference_mode()
def test_prefill_then_decode_equals_full_recompute(lm):
    ids = _ids(29, seed=4)
    prompt = 21  # > one chunk (16) and not a multiple of it
    state = lm.new_state()
    logits = [lm.forward_embeds(lm.embed_tokens(ids[:, :prompt]), [state], last_only=True)]
    for t in range(prompt, ids.shape[1]):
        logits.append(lm.forward_embeds(lm.embed_tokens(ids[:, t:t + 1]), [state], last_only=True))
    assert state.num_tokens == ids.shape[1]
    for i, got in enumerate(logits):
        full = lm(ids[:, :prompt + i])[:, -1]  # recompute the whole sequence
        assert torch.allclose(got, full, atol=1e-4), (i, (got - full).abs().max())


@torch.inference_mode()
def test_continued_prefill_equals_one_prefill(lm):
    ids = _ids(50, seed=5)
    one = lm(ids)
    state = lm.new_state()
    a = lm.forward_embeds(lm.embed_tokens(ids[:, :19]), [state])
    b = lm.forward_embeds(lm.embed_tokens(ids[:, 19:]), [state])
    assert torch.allclose(torch.cat([a, b], 1), one, atol=1e-4)


@torch.inference_mode()
def test_batched_decode_with_different_lengths_equals_single(lm):
    prompts = [_ids(n, seed=n) for n in (7, 30, 18)]
    states = [lm.new_state() for _ in prompts]
    for p, s in zip(prompts, states, strict=True):
        lm.forward_embeds(lm.embed_tokens(p), [s])
    nxt = torch.tensor([[5], [17], [250]])
    batched = lm.forward_embeds(lm.embed_tokens(nxt), states, last_only=True)
    for i, p in enumerate(prompts):
        ref = lm(torch.cat([p, nxt[i:i + 1]], 1))[:, -1]
        assert torch.allclose(batched[i:i + 1], ref, atol=1e-4), (i, (batched[i] - ref).abs().max())


def _hf_model(cfg: LLMConfig, ours: NemotronHLM):
    from transformers.models.nemotron_h import NemotronHConfig, NemotronHForCausalLM

    hc = NemotronHConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, hybrid_override_pattern=cfg.hybrid_override_pattern,
        num_hidden_layers=cfg.num_hidden_layers, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, mamba_num_heads=cfg.mamba_num_heads, mamba_head_dim=cfg.mamba_head_dim,
        ssm_state_size=cfg.ssm_state_size, n_groups=cfg.n_groups, conv_kernel=cfg.conv_kernel,
        chunk_size=cfg.chunk_size, layer_norm_epsilon=cfg.layer_norm_epsilon, use_conv_bias=cfg.use_conv_bias,
        use_bias=cfg.mamba_proj_bias, mlp_bias=cfg.mlp_bias, attention_bias=cfg.attention_bias,
        mlp_hidden_act=cfg.mlp_hidden_act, mamba_hidden_act=cfg.mamba_hidden_act, tie_word_embeddings=False)
    hf = NemotronHForCausalLM(hc).eval()
    # names: ours `backbone.*` == HF `model.*`; everything else identical
    sd = {k.replace("backbone.", "model.", 1): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    # HF's mixer clamps dt >= time_step_min (0.001) in its torch prefill path but not in decode; the
    # checkpoint's time_step_limit (0, inf) means no clamp (as the CUDA kernels / vLLM do), so set
    # HF's limit to the config's to compare like with like.
    for layer in hf.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = tuple(cfg.time_step_limit)
    return hf


@torch.inference_mode()
def test_logits_match_transformers_nemotron_h(llm_cfg, lm):
    hf = _hf_model(llm_cfg, lm)
    ids = _ids(45, batch=2, seed=11)
    ours, ref = lm(ids), hf(ids).logits
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, diff
    assert ref.abs().max() > 0.5  # the comparison is not trivially between near-zero logits

    # cached decode: HF DynamicCache vs our states, token by token
    out = hf(ids[:1, :30], use_cache=True)
    pkv = out.past_key_values
    state = lm.new_state()
    got = lm.forward_embeds(lm.embed_tokens(ids[:1, :30]), [state], last_only=True)
    assert (got - out.logits[:, -1]).abs().max() < 1e-4
    for t in range(30, 33):
        o = hf(ids[:1, t:t + 1], past_key_values=pkv, use_cache=True)
        pkv = o.past_key_values
        got = lm.forward_embeds(lm.embed_tokens(ids[:1, t:t + 1]), [state], last_only=True)
        assert (got - o.logits[:, -1]).abs().max() < 1e-4, t


@torch.inference_mode()
def test_time_step_limit_is_applied():
    cfg = tiny_cfg(time_step_limit=[0.05, 0.06]).llm
    clamped = random_init_(NemotronHLM(cfg), seed=3).eval()
    free = random_init_(NemotronHLM(tiny_cfg().llm), seed=3).eval()
    ids = _ids(20, seed=2)
    assert (clamped(ids) - free(ids)).abs().max() > 1e-3
    mixer = clamped.backbone.layers[0].mixer
    dt = mixer._dt(torch.tensor([-30.0, 0.0, 30.0]).repeat(cfg.mamba_num_heads, 1).T)
    assert dt.min().item() == pytest.approx(0.05) and dt.max().item() == pytest.approx(0.06)


@torch.inference_mode()
def test_bf16_weights_keep_fp32_states(llm_cfg, lm):
    bf = random_init_(NemotronHLM(llm_cfg), seed=3).to(torch.bfloat16).eval()
    ids = _ids(25, seed=6)
    state = bf.new_state()
    logits = bf.forward_embeds(bf.embed_tokens(ids), [state])
    assert logits.dtype == torch.float32
    m = state.mamba[0]
    assert m.conv.dtype == torch.float32 and m.ssm.dtype == torch.float32
    assert state.kv[llm_cfg.hybrid_override_pattern.index("*")].k.dtype == torch.bfloat16
    ref = lm(ids)
    diff = (logits - ref).abs().max().item()
    assert 0 < diff < 0.1, diff  # bf16 rounding only


def test_state_dict_names_are_checkpoint_names(llm_cfg):
    names = set(NemotronHLM(llm_cfg).state_dict())
    assert "backbone.embeddings.weight" in names and "lm_head.weight" in names
    assert "backbone.norm_f.weight" in names
    for i, kind in enumerate(llm_cfg.hybrid_override_pattern):
        assert f"backbone.layers.{i}.norm.weight" in names
        expect = {"M": ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                        "out_proj.weight"],
                  "*": ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"],
                  "-": ["up_proj.weight", "down_proj.weight"]}[kind]
        got = sorted(n.split(f"layers.{i}.mixer.")[1] for n in names if f"layers.{i}.mixer." in n)
        assert got == sorted(expect)
