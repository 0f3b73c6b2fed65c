"""EVS — Efficient Video Sampling: prune video tokens that barely change between frames (docs/model.md §3.4).

Runs on the projected video embeddings ``[T, P, D]`` (P = ``cfg.tokens_per_tile`` tokens per frame,
in row-major order of the token grid, D = LLM hidden size), after RADIO → pixel shuffle → mlp1.

* Retained count ``R = max(P, int(T·P·(1 − q)))`` (`retained_count`).
* Dissimilarity ``d[t, p] = 1 − cos(E[t, p], E[t−1, p])`` for t ≥ 1 (same token position in the
  previous frame), computed in float32 with torch's ``cosine_similarity`` (eps 1e-8);
  ``d[0, :] = 255`` so frame 0 is always kept whole.
* Flatten ``d`` in (t, p) order, stable descending argsort, keep the first R positions. Kept
  tokens stay in their original (t, p) order; per-frame counts ``n_t = mask[t].sum()``.
* q = 0 keeps everything (identity).

The prompt is laid out before EVS with all R context tokens in frame 1; after EVS
`nemovl_trt.preprocess.prompt.rebuild_video_prompt` redistributes them as ``n_t`` per frame
(total length unchanged).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported inside the functions that need it, so the preprocessor
    import torch  # process (which only calls retained_count / check_pruning_rate) starts without it

from nemovl_trt.preprocess.errors import INVALID_PARAMETER, PreprocessError

FIRST_FRAME_SCORE = 255.0  # docs/model.md §3.4: frame 0's tokens always rank first
_COS_EPS = 1e-8


def check_pruning_rate(q: float) -> float:
    """Validate ``video_pruning_rate``: a number with 0 ≤ q < 1 (else ``invalid_parameter``)."""
    if isinstance(q, bool) or not isinstance(q, int | float) or not math.isfinite(q) or not (0.0 <= q < 1.0):
        raise PreprocessError(INVALID_PARAMETER, f"video_pruning_rate must be a number in [0, 1), got {q!r}.",
                              param="video_pruning_rate")
    return float(q)


def retained_count(num_frames: int, tokens_per_frame: int, q: float) -> int:
    """``R = max(P, int(T·P·(1 − q)))`` tokens kept for a T-frame video (T·P when q = 0)."""
    q = check_pruning_rate(q)
    total = num_frames * tokens_per_frame
    if q == 0.0:
        return total
    return min(total, max(tokens_per_frame, int(num_frames * tokens_per_frame * (1 - q))))


def dissimilarity(embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32 ``[T, P]``: 255 for frame 0, else 1 − cosine similarity with the previous frame."""
    import torch

    e = torch.as_tensor(embeddings).detach().to(dtype=torch.float32, device="cpu")
    if e.ndim != 3:
        raise ValueError(f"EVS expects embeddings [T, P, D], got shape {tuple(e.shape)}")
    d = torch.full(e.shape[:2], FIRST_FRAME_SCORE, dtype=torch.float32)
    if e.shape[0] > 1:
        d[1:] = 1.0 - torch.nn.functional.cosine_similarity(e[1:], e[:-1], dim=-1, eps=_COS_EPS)
    return d


def evs_keep_mask(embeddings: torch.Tensor | np.ndarray, q: float) -> np.ndarray:
    """Which video tokens EVS keeps.

    Args:
        embeddings: ``[T, P, D]`` projected embeddings of one video (torch or numpy, any float dtype).
        q: pruning rate, 0 ≤ q < 1.

    Returns:
        bool ``[T, P]`` numpy mask with exactly `retained_count`(T, P, q) True entries; frame 0 all True.
    """
    import torch

    t, p = int(embeddings.shape[0]), int(embeddings.shape[1])
    r = retained_count(t, p, q)
    if r >= t * p:
        return np.ones((t, p), dtype=bool)
    order = torch.argsort(dissimilarity(embeddings).flatten(), descending=True, stable=True)
    mask = np.zeros(t * p, dtype=bool)
    mask[order[:r].numpy()] = True
    return mask.reshape(t, p)


def per_frame_counts(mask: np.ndarray) -> list[int]:
    """``n_t`` = kept tokens of each frame, from a ``[T, P]`` mask."""
    return [int(v) for v in np.asarray(mask).sum(axis=1)]


def apply_evs(embeddings: torch.Tensor, q: float) -> tuple[torch.Tensor, list[int], np.ndarray]:
    """Prune ``[T, P, D]`` embeddings → (kept ``[R, D]`` in original order, per-frame counts, mask)."""
    import torch

    mask = evs_keep_mask(embeddings, q)
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    kept = flat[torch.from_numpy(mask.reshape(-1)).to(flat.device)]
    return kept, per_frame_counts(mask), mask
