"""Closed-loop load generation: N concurrent workers, each sending its next request as soon as the
previous one finished, bounded by a request count and a wall-clock budget.

Times are `time.perf_counter()` seconds; summaries are in milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import summarize


@dataclass
class RequestRecord:
    """One streamed request as seen by the client.

    `ttft_s`: request sent → first generated token received; `e2e_s`: request sent → stream complete;
    `completion_tokens`: tokens generated (from the server's count); `prompt_tokens`: prompt length
    after image/video expansion (None when the path does not report it).
    """

    ok: bool
    start_s: float
    e2e_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency of this request: (e2e − ttft) / (tokens − 1), seconds."""
        if not self.ok or self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass
class LoadResult:
    """The records of one closed-loop run and its wall time (first send → last completion), seconds."""

    concurrency: int
    records: list[RequestRecord]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        """Throughput and latency percentiles of the successful requests (latencies in ms)."""
        ok = [r for r in self.records if r.ok]
        tokens = sum(r.completion_tokens for r in ok)
        wall = max(self.wall_s, 1e-9)
        prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        errors = sorted({r.error or "" for r in self.records if not r.ok})
        return {
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "errors": len(self.records) - len(ok),
            "error_samples": errors[:3],
            "wall_s": self.wall_s,
            "request_throughput_rps": len(ok) / wall,
            "output_token_throughput_tps": tokens / wall,
            "completion_tokens_mean": tokens / len(ok) if ok else None,
            "prompt_tokens_mean": sum(prompt) / len(prompt) if prompt else None,
            "ttft_ms": summarize([r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
            "itl_ms": summarize([r.itl_s for r in ok if r.itl_s is not None], 1e3),
            "e2e_ms": summarize([r.e2e_s for r in ok], 1e3),
        }


async def closed_loop(
    send: Callable[[int], Awaitable[RequestRecord]],
    concurrency: int,
    max_requests: int,
    time_budget_s: float,
) -> LoadResult:
    """Run `send(i)` for i = 0, 1, … with `concurrency` requests in flight.

    No new request starts once `max_requests` were started or `time_budget_s` seconds passed since the
    start; requests in flight are awaited. `send` must not raise: it reports failures in its record.
    """
    t0 = time.perf_counter()
    deadline = t0 + time_budget_s
    next_index = 0
    records: list[RequestRecord] = []

    async def worker() -> None:
        nonlocal next_index
        while next_index < max_requests and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            records.append(await send(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = (max((r.start_s + r.e2e_s for r in records), default=t0) - t0) if records else 0.0
    return LoadResult(concurrency=concurrency, records=records, wall_s=wall)
