"""Memory plan of the real 12B config against hand arithmetic (docs/model.md §1, §4, §6)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from nemovl_trt.build.plan import llm_params, plan_memory, vision_params
from nemovl_trt.build.targets import load_target
from nemovl_trt.checkpoint.config import parse_vlm_config
from nemovl_trt.checkpoint.presets import preset_config

GIB = 2**30

# --- 12B sizes worked out by hand from docs/model.md §6 (h 5120, vocab 131200, 28 M / 6 * / 28 - layers) ---
M_LAYER_STATE = (12288 * 3 + 128 * 80 * 128) * 4  # conv_dim·(k−1) + heads·head_dim·state, fp32
MAMBA_STATE = 28 * M_LAYER_STATE
KV_BF16 = 6 * 2 * 8 * 128 * 2
KV_FP8 = 6 * 2 * 8 * 128 * 1
EMB = 131200 * 5120
MAMBA_LAYER = (5120 * 22656 + 12288 * 4 + 12288 + 3 * 128 + 10240 + 10240 * 5120) + 5120
ATTN_LAYER = (5120 * 5120 + 2 * 5120 * 1024 + 5120 * 5120) + 5120
MLP_LAYER = 2 * 5120 * 20480 + 5120
LLM_PARAMS = 2 * EMB + 28 * MAMBA_LAYER + 6 * ATTN_LAYER + 28 * MLP_LAYER + 5120
LLM_LINEAR = 28 * (5120 * 22656 + 10240 * 5120) + 6 * (2 * 5120 * 5120 + 2 * 5120 * 1024) + 28 * 2 * 5120 * 20480
N_LINEARS = 28 * 2 + 6 * 4 + 28 * 2
VIT_BLOCK = 4 * 1280 + 1280 * 3840 + 3840 + 1280 * 1280 + 1280 + 1280 * 5120 + 5120 + 5120 * 1280 + 1280
VISION_PARAMS = 768 * 1280 + 128 * 128 * 1280 + 8 * 1280 + 32 * VIT_BLOCK + 5120 + 5120 * 20480 + 20480 * 5120


@pytest.fixture(scope="module")
def cfg():
    return parse_vlm_config(preset_config("12b-config"))


def test_hand_numbers_themselves():
    assert M_LAYER_STATE == 5_390_336
    assert MAMBA_STATE == 150_929_408
    assert (KV_BF16, KV_FP8) == (24_576, 12_288)
    assert LLM_PARAMS == 12_311_311_872
    assert VISION_PARAMS == 861_363_200


def test_param_counts_match_hand_arithmetic_and_the_tensor_list(cfg):
    from nemovl_trt.checkpoint.weights import llm_tensors, projector_tensors, vision_tensors

    lp = llm_params(cfg.llm)
    assert lp.total == LLM_PARAMS
    assert (lp.quantizable, lp.num_quantizable_linears) == (LLM_LINEAR, N_LINEARS)
    assert vision_params(cfg) == VISION_PARAMS
    # the checkpoint's own tensor list (weights.py) agrees; RADIO's buffers are not parameters
    assert sum(math.prod(s) for s in llm_tensors(cfg).values()) == LLM_PARAMS
    vis = {k: s for k, s in {**vision_tensors(cfg), **projector_tensors(cfg)}.items()
           if "input_conditioner" not in k and "summary_idxs" not in k}
    assert sum(math.prod(s) for s in vis.values()) == VISION_PARAMS


@pytest.mark.parametrize("name", ["a100", "l40s", "h100", "b200"])
def test_12b_plan_numbers(cfg, name):
    t = load_target(name)
    p = plan_memory(cfg, t)
    bf16_rest = (LLM_PARAMS - LLM_LINEAR) * 2
    llm_w = {"bf16": LLM_PARAMS * 2,
             "fp8": bf16_rest + LLM_LINEAR * 1 + N_LINEARS * 8,
             "nvfp4": bf16_rest + LLM_LINEAR // 2 + LLM_LINEAR // 16 + N_LINEARS * 8}[t.llm_precision]
    assert p.llm_weights_bytes == llm_w
    assert p.weights_bytes == llm_w + VISION_PARAMS * 2  # fp16 vision
    assert p.mamba_state_bytes_per_seq == MAMBA_STATE
    assert p.kv_bytes_per_token == {"bf16": KV_BF16, "fp8": KV_FP8}[t.kv_cache_dtype]
    # activations: tokens·2B·(2h + widest layer = mamba in_proj+conv+d_inner) + scan states + fp32 logits
    T = t.limits.max_num_tokens
    llm_act = T * 2 * (2 * 5120 + 22656 + 12288 + 10240) + math.ceil(T / 128) * 128 * 80 * 128 * 4 \
        + min(T, t.limits.max_batch_size) * 131200 * 4
    tiles = 4 * 13
    vis_act = (tiles * 1032 * (2 * 1280 + 5120) + tiles * 256 * (5120 + 20480 + 5120)) * 2
    assert (p.llm_activation_bytes, p.vision_activation_bytes) == (llm_act, vis_act)
    assert p.vision_max_batch_tiles == tiles
    budget = int(int(t.gpu_memory_gib * GIB) * 0.9)
    per_seq = MAMBA_STATE + t.limits.max_seq_len * p.kv_bytes_per_token
    fit = (budget - p.weights_bytes - llm_act - vis_act) // per_seq
    assert p.max_batch_size == fit and fit >= 1
    assert p.engine_max_batch_size == min(fit, t.limits.max_batch_size)
    b, ctx = p.engine_max_batch_size, t.limits.max_seq_len // 2
    bound = b * t.hbm_bandwidth_gbps * 1e9 / (llm_w + b * (MAMBA_STATE + ctx * p.kv_bytes_per_token))
    assert p.decode_tokens_per_s_bound == pytest.approx(bound, abs=0.06)
    assert p.decode_tokens_per_s_bound_batch1 == pytest.approx(
        t.hbm_bandwidth_gbps * 1e9 / (llm_w + MAMBA_STATE + ctx * p.kv_bytes_per_token), abs=0.06)


def test_12b_table_values(cfg):
    """The numbers docs/build.md quotes."""
    got = {n: plan_memory(cfg, load_target(n)) for n in ("a100", "l40s", "h100", "b200")}
    assert {n: p.max_batch_size for n, p in got.items()} == {"a100": 14, "l40s": 26, "h100": 33, "b200": 89}
    assert round(got["h100"].weights_bytes / 1e9, 2) == 15.38


def test_cpu_target_caps_seq_len_by_the_checkpoint(cfg):
    p = plan_memory(cfg, load_target("cpu"))
    assert p.max_seq_len == 8192  # min(target 8192, checkpoint 131072)
    assert p.max_batch_size == 0 and p.engine_max_batch_size == 0  # 12B in fp32 does not fit in the host budget


def test_plan_cli_json_on_config_only_checkpoint(tmp_path, cfg):
    from nemovl_trt.checkpoint.synth import write_checkpoint
    from nemovl_trt.cli import build_cli

    write_checkpoint(tmp_path / "12b", "12b-config")
    r = CliRunner().invoke(build_cli, ["plan", "--target", "b200", "--checkpoint", str(tmp_path / "12b"),
                                       "--llm-precision", "fp8", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    want = plan_memory(cfg, load_target("b200").with_llm_precision("fp8")).to_dict()
    assert data == want
    for key in ("weights_bytes", "mamba_state_bytes_per_seq", "kv_bytes_per_token", "activation_bytes",
                "max_batch_size", "decode_tokens_per_s_bound"):
        assert key in data
    r = CliRunner().invoke(build_cli, ["plan", "--target", "h100", "--checkpoint", str(tmp_path / "12b")])
    assert r.exit_code == 0 and "mamba_state_bytes_per_seq  150,929,408" in r.output
    assert "33 fit; configured cap 128; engines built for 33" in r.output
