"""The pure halves of the TensorRT-LLM path (no tensorrt_llm needed): our prompt/embedding packaging and
the input processor's core that checks our rows against the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemovl_trt.runtime.trtllm_processor import EMBEDDING_KEY, attach_embeddings
from nemovl_trt.runtime.trtllm_requests import (
    EMBEDDINGS_MODALITY,
    LOGPROB_FLOOR,
    UnsupportedOnTrtllm,
    choice_layout,
    embeddings_tensor,
    finish_reason,
    prompt_inputs,
    prompt_logprobs,
    sampling_kwargs,
    token_logprobs,
)
from tests.fake_tensorrt_llm import FakeLogprob

IMG = 1500  # image-context id of the tiny preset
HIDDEN = 8


def test_prompt_inputs_keys_rows_by_modality_and_keeps_ids() -> None:
    rows = embeddings_tensor(np.arange(3 * HIDDEN, dtype=np.float32).reshape(3, HIDDEN), "bfloat16")
    inputs = prompt_inputs([1, IMG, IMG, IMG, 7], rows)
    assert inputs["prompt_token_ids"] == [1, IMG, IMG, IMG, 7]
    assert list(inputs["multi_modal_embeddings"]) == [EMBEDDINGS_MODALITY] == ["image"]
    (t,) = inputs["multi_modal_embeddings"]["image"]
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (3, HIDDEN) and t.device.type == "cpu"
    assert float(t[2, 7]) == 23.0  # bf16 holds small integers exactly
    # text-only: no embeddings key at all (upstream's pass-through branch)
    assert prompt_inputs([1, 2], None) == {"prompt_token_ids": [1, 2]}
    assert embeddings_tensor(np.zeros((0, HIDDEN), np.float32), "bfloat16") is None
    with pytest.raises(ValueError, match=r"\[rows, hidden\]"):
        embeddings_tensor(np.zeros((2, 3, HIDDEN), np.float32), "bfloat16")


def test_attach_embeddings_checks_rows_against_the_prompt() -> None:
    ids = [1, 2, IMG, IMG, 3, IMG, 4]
    a, b = torch.ones(2, HIDDEN), torch.full((1, HIDDEN), 2.0)
    out_ids, extra = attach_embeddings(ids, {"image": [a, b]}, IMG, HIDDEN, torch.bfloat16)
    assert out_ids == ids  # never re-tokenised
    emb = extra["multimodal_data"][EMBEDDING_KEY]
    assert emb.dtype == torch.bfloat16 and tuple(emb.shape) == (3, HIDDEN)
    assert emb[:, 0].tolist() == [1.0, 1.0, 2.0]  # prompt order kept
    with pytest.raises(ValueError, match="3 image-context tokens .* 2 vision embedding rows"):
        attach_embeddings(ids, {"image": [a]}, IMG, HIDDEN, torch.bfloat16)
    with pytest.raises(ValueError, match="hidden size 4; the LLM expects 8"):
        attach_embeddings(ids, {"image": [torch.ones(3, 4)]}, IMG, HIDDEN, torch.bfloat16)
    with pytest.raises(ValueError, match="dict keyed by modality"):  # today's old call: a bare tensor
        attach_embeddings(ids, torch.ones(3, HIDDEN), IMG, HIDDEN, torch.bfloat16)
    with pytest.raises(ValueError, match="modality 'video'"):
        attach_embeddings(ids, {"video": [torch.ones(3, HIDDEN)]}, IMG, HIDDEN, torch.bfloat16)


@pytest.mark.parametrize(("opts", "expected"), [
    ({"max_new_tokens": 5}, {"max_tokens": 5, "top_k": 1}),
    ({"max_new_tokens": 5, "temperature": 0.0, "top_p": 0.5, "seed": None}, {"max_tokens": 5, "top_k": 1}),
    # FLT_MIN (found by fuzzing): greedy, as on the cpu engine, instead of logits / 1e-38 on the GPU
    ({"max_new_tokens": 5, "temperature": 1.1754943508222875e-38}, {"max_tokens": 5, "top_k": 1}),
    ({"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "stop_token_ids": [12],
      "ignore_eos": True},
     {"max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "stop_token_ids": [12],
      "include_stop_str_in_output": True, "ignore_eos": True}),
    ({"max_new_tokens": 2, "temperature": 1.0, "top_p": 1.0, "top_k": 0}, {"max_tokens": 2, "temperature": 1.0}),
])
def test_sampling_kwargs(opts, expected) -> None:
    assert sampling_kwargs(opts) == expected


def test_finish_reasons() -> None:
    assert [finish_reason(r) for r in ("stop", "length", "cancelled", "timeout", None)] == \
        ["stop", "length", "cancelled", "length", "stop"]


def test_token_logprobs_from_token_logprobs_dicts_and_floats() -> None:
    """TokenLogprobs positions → [chosen logprob, k best by rank]; the chosen token may sit outside the top-K
    (upstream appends it with its rank), be missing (floor, as trtllm-serve), or come as a bare float."""
    lp = FakeLogprob
    positions = [
        {7: lp(logprob=-0.1, rank=1), 3: lp(logprob=-2.5, rank=2)},
        {4: lp(logprob=-0.2, rank=1), 5: lp(logprob=-0.9, rank=2), 8: lp(logprob=-3.0, rank=9)},
        {4: lp(logprob=-0.3, rank=1)},
        -1.25,
        {2: lp(logprob=float("-inf"), rank=1)},
    ]
    out = token_logprobs([7, 8, 9, 6, 2], positions, 1)
    assert out == [[-0.1, [[7, -0.1]]], [-3.0, [[4, -0.2]]], [LOGPROB_FLOOR, [[4, -0.3]]], [-1.25, []],
                   [LOGPROB_FLOOR, [[2, LOGPROB_FLOOR]]]]
    assert token_logprobs([8], positions[1:2], 3) == [[-3.0, [[4, -0.2], [5, -0.9], [8, -3.0]]]]
    assert token_logprobs([8], positions[1:2], 0) == [[-3.0, []]]
    # rank missing: best logprob first
    assert token_logprobs([1], [{1: lp(logprob=-1.0), 2: lp(logprob=-0.5)}], 2) == [[-1.0, [[2, -0.5], [1, -1.0]]]]


def test_prompt_logprobs_shift_and_first_none() -> None:
    lp = FakeLogprob
    ids = [10, 11, 12]
    full = [{11: lp(logprob=-1.0, rank=1)}, {12: lp(logprob=-2.0, rank=1)}, {99: lp(logprob=-0.1, rank=1)}]
    assert prompt_logprobs(ids, full, 1) == [None, [-1.0, [[11, -1.0]]], [-2.0, [[12, -2.0]]]]
    assert prompt_logprobs(ids, full[:2], 0) == [None, [-1.0, []], [-2.0, []]]  # already aligned to tokens 1..


@pytest.mark.parametrize(("opts", "layout"), [
    ({}, (1, 1, None, 1)),
    ({"n": 3, "temperature": 0.0}, (3, 1, None, 3)),
    ({"n": 3, "best_of": 5, "temperature": 0.0}, (3, 1, None, 3)),
    ({"n": 3, "temperature": 0.7}, (3, 3, None, 1)),
    ({"n": 2, "best_of": 2, "temperature": 0.7}, (2, 2, None, 1)),
    ({"n": 2, "best_of": 4, "temperature": 0.7}, (2, 2, 4, 1)),
])
def test_choice_layout(opts, layout) -> None:
    got = choice_layout(opts)
    assert (got.n, got.upstream_n, got.upstream_best_of, got.copies) == layout
    assert got.ranked == (layout[2] is not None)


def test_best_of_below_n_is_refused() -> None:
    with pytest.raises(UnsupportedOnTrtllm, match=r"^\[invalid_parameter\] best_of \(1\) must be at least n \(2\)"):
        choice_layout({"n": 2, "best_of": 1, "temperature": 1.0})


@pytest.mark.parametrize(("seed", "sent"), [(0, 0), (-1, 2**64 - 1), (-(2**63), 2**63), (2**63 - 1, 2**63 - 1)])
def test_seed_is_sent_as_uint64(seed: int, sent: int) -> None:
    assert sampling_kwargs({"max_new_tokens": 1, "temperature": 1.0, "seed": seed})["seed"] == sent
