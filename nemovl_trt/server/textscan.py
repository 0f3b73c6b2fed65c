"""Helpers for scanning streamed text for tags that may be split across chunks."""

from __future__ import annotations


def safe_prefix_len(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest prefix of `buf` that cannot be the start of any tag in `tags`.

    The rest (a suffix that is a proper prefix of some tag) must be held back until more text arrives.
    Example: buf="abc<thi", tags=("<think>",) → 3.
    """
    keep = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(buf)), 0, -1):
            if buf.endswith(tag[:k]):
                keep = max(keep, k)
                break
    return len(buf) - keep
