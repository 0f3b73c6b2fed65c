"""EVS on constructed embeddings (docs/model.md §3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemovl_trt.preprocess.errors import PreprocessError
from nemovl_trt.preprocess.evs import (
    apply_evs,
    dissimilarity,
    evs_keep_mask,
    per_frame_counts,
    retained_count,
)


@pytest.mark.parametrize(("t", "p", "q", "r"), [
    (8, 256, 0.7, 614),  # int(2048 * 0.30000000000000004) = 614
    (8, 256, 0.75, 512),
    (1, 256, 0.7, 256),  # never below one frame
    (8, 256, 0.95, 256),
    (128, 256, 0.7, 9830),
    (8, 256, 0.0, 2048),
    (3, 16, 0.5, 24),
])
def test_retained_count(t, p, q, r):
    assert retained_count(t, p, q) == r


@pytest.mark.parametrize("q", [1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_rate(q):
    with pytest.raises(PreprocessError) as e:
        retained_count(8, 16, q)
    assert e.value.code == "invalid_parameter" and e.value.param == "video_pruning_rate"


def _static(t: int, p: int, d: int, seed: int = 0) -> torch.Tensor:
    frame = torch.randn(p, d, generator=torch.Generator().manual_seed(seed))
    return frame.expand(t, p, d).clone()


def test_static_clip_keeps_frame_zero_only():
    e = _static(8, 16, 32)
    mask = evs_keep_mask(e, 0.9)  # R = max(16, int(128 * 0.1)) = 16
    assert mask.shape == (8, 16) and mask.dtype == bool
    assert mask[0].all() and not mask[1:].any()
    assert per_frame_counts(mask) == [16, 0, 0, 0, 0, 0, 0, 0]


def test_static_clip_at_default_rate_keeps_frame_zero_and_r_tokens():
    mask = evs_keep_mask(_static(8, 16, 32, seed=1), 0.7)
    assert mask[0].all() and int(mask.sum()) == retained_count(8, 16, 0.7) == 38


def test_exact_ties_are_broken_in_original_order():
    e = torch.zeros(4, 6, 5)
    e[..., 0] = 1.0  # every token identical: d = 0 exactly for t >= 1
    mask = evs_keep_mask(e, 0.5)  # R = 12: frame 0 (6) + the first 6 of frame 1
    assert per_frame_counts(mask) == [6, 6, 0, 0]


def test_q_zero_keeps_everything():
    e = torch.randn(5, 16, 8)
    assert evs_keep_mask(e, 0.0).all()
    kept, counts, _ = apply_evs(e, 0.0)
    assert torch.equal(kept, e.reshape(-1, 8)) and counts == [16] * 5


def test_moving_tokens_are_kept_in_order():
    t, p, d = 6, 16, 8
    e = _static(t, p, d, seed=2)
    moved = {1: [3], 2: [4, 9], 3: [5], 4: [], 5: [6, 7]}  # positions that change vs the previous frame
    for frame in range(1, t):
        e[frame] = e[frame - 1]
        for pos in moved[frame]:
            e[frame, pos] = torch.randn(d, generator=torch.Generator().manual_seed(100 + 10 * frame + pos))
    n_moved = sum(len(v) for v in moved.values())
    q = 1 - (p + n_moved) / (t * p)  # R = p + n_moved (up to float truncation)
    r = retained_count(t, p, q)
    mask = evs_keep_mask(e, q)
    expected = np.zeros((t, p), dtype=bool)
    expected[0] = True
    for frame, positions in moved.items():
        expected[frame, positions] = True
    if r == p + n_moved:
        assert np.array_equal(mask, expected)
    else:  # int() truncated one below: everything kept is still frame 0 or a moved token
        assert r == p + n_moved - 1 and not (mask & ~expected).any()
    kept, counts, _ = apply_evs(e, q)
    assert torch.equal(kept, e[torch.from_numpy(mask)])  # original (t, p) order
    assert counts == per_frame_counts(mask) and sum(counts) == r


def test_dissimilarity_values_and_numpy_input():
    e = np.zeros((3, 2, 2), np.float32)
    e[0] = [[1, 0], [0, 1]]
    e[1] = [[0, 1], [0, 1]]  # position 0 turns 90 degrees, position 1 stays
    e[2] = [[0, -1], [0, 2]]  # position 0 reverses, position 1 scales
    d = dissimilarity(e)
    assert d[0].tolist() == [255.0, 255.0]
    assert d[1].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert d[2].tolist() == pytest.approx([2.0, 0.0], abs=1e-6)
    mask = evs_keep_mask(e, 0.5)  # R = 3: frame 0 and the reversed token (d = 2)
    assert mask.tolist() == [[True, True], [False, False], [True, False]]


def test_bf16_input():
    e = torch.randn(4, 16, 8).to(torch.bfloat16)
    mask = evs_keep_mask(e, 0.7)
    assert mask[0].all() and int(mask.sum()) == retained_count(4, 16, 0.7)
