"""The frontend's replica set: several Triton servers serving the same repository behind one frontend.

Each `Replica` is UP or DOWN and counts its traffic (in flight, requests, failures, retries, failed health
checks). `ReplicaSet.pick()` routes a request to the UP replica with the fewest requests in flight (ties take
turns); a conversation has no affinity (there is no prefix cache to reuse), so every turn is routed afresh.

A replica goes DOWN when
- its health check fails (`probe`: Triton ready and every model of its repository READY; a "not ready" answer
  or a refused connection at once, a check that times out `down_after` times in a row), or
- a request on it fails at the transport level (gRPC UNAVAILABLE: connection refused or reset, the server
  gone) or with "model not ready" (a crashed or restarting model) — `mark_down()`, called by the pool;
and comes back UP when a health check passes again (or a request on it succeeds, which only happens when every
replica was down and the pool tried one anyway). One watcher task per replica probes an UP replica every
`HealthPolicy.interval_s` and a DOWN one after `backoff_initial_s`, doubling up to `backoff_max_s`, so a
restarted replica takes traffic again within about `backoff_max_s` of being ready.

The retry rule (once, on another UP replica, only while no chunk of the request reached the caller) is the
pool's (nemovl_trt/server/triton_client.py, `TritonPool.generate`); this module only keeps the state.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("nemovl.replicas")


class ReplicaState(enum.StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class HealthPolicy:
    """How replicas are watched and how often a failed request is retried (seconds)."""

    interval_s: float = 1.0  # health check period of an UP replica
    backoff_initial_s: float = 0.25  # first re-check of a DOWN replica
    backoff_max_s: float = 2.0  # a DOWN replica is re-checked at least this often
    probe_timeout_s: float = 5.0  # one health check (two gRPC calls; a loaded 2-core host can take seconds)
    # timed-out checks in a row that take an UP replica down (one slow answer on a loaded host is not a
    # failure); a definite "not ready" or a refused connection takes it down at once
    down_after: int = 2
    retries: int = 1  # re-sends of a request whose replica failed before its first chunk

    def __post_init__(self) -> None:
        if min(self.interval_s, self.backoff_initial_s, self.probe_timeout_s) <= 0:
            raise ValueError("health check intervals and timeouts must be positive.")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s.")
        if self.retries < 0:
            raise ValueError("retries must be 0 or more.")
        if self.down_after < 1:
            raise ValueError("down_after must be at least 1.")


@dataclass
class Replica:
    """One Triton endpoint (`url` = gRPC HOST:PORT) and its counters."""

    url: str
    index: int
    client: Any = None  # the gRPC client, created inside the running event loop
    state: ReplicaState = ReplicaState.UP  # optimistic until the first health check
    in_flight: int = 0
    requests: int = 0  # attempts routed here (a retried request counts on both replicas)
    failures: int = 0  # attempts that failed here at the transport level / model not ready
    retries: int = 0  # of those, the ones re-sent to another replica (no chunk had gone out)
    probe_failures: int = 0  # failed health checks
    last_error: str = ""
    changed_at: float = field(default_factory=time.monotonic)
    probed: bool = False  # at least one health check finished
    passed: bool = False  # at least one health check passed
    streak: int = 0  # failed health checks in a row
    _wake: asyncio.Event | None = None

    @property
    def up(self) -> bool:
        return self.state == ReplicaState.UP


@dataclass(frozen=True)
class ReplicaSnapshot:
    """What /metrics shows for one replica."""

    url: str
    up: bool
    in_flight: int
    requests: int
    failures: int
    retries: int
    probe_failures: int


Probe = Callable[[Replica], Awaitable[bool]]


class ReplicaSet:
    """Replicas of one model, their health watchers and the routing choice. Create anywhere; the gRPC
    clients (`connect(url)`) and the watcher tasks are created on first use inside the event loop."""

    def __init__(self, urls: list[str], probe: Probe, connect: Callable[[str], Any],
                 policy: HealthPolicy | None = None) -> None:
        if not urls:
            raise ValueError("At least one Triton gRPC endpoint is needed.")
        if len(set(urls)) != len(urls):
            raise ValueError(f"The Triton endpoints {urls} name one server twice.")
        self.policy = policy or HealthPolicy()
        self.replicas = [Replica(u, i) for i, u in enumerate(urls)]
        self._probe = probe
        self._connect = connect
        self._rr = itertools.count()
        self._watchers: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle
    def started(self) -> list[Replica]:
        """The replicas, with clients and watchers running (call inside the event loop)."""
        for r in self.replicas:
            if r.client is None:
                r.client = self._connect(r.url)
        if not self._watchers:
            self._watchers = [asyncio.get_running_loop().create_task(self._watch(r), name=f"replica-{r.index}")
                              for r in self.replicas]
        return self.replicas

    async def close(self) -> None:
        for t in self._watchers:
            t.cancel()
        for t in self._watchers:
            with suppress(asyncio.CancelledError, Exception):
                await t
        self._watchers = []
        for r in self.replicas:
            if r.client is not None:
                with suppress(Exception):
                    await r.client.close()
                r.client = None

    # ------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def any_up(self) -> bool:
        return any(r.up for r in self.replicas)

    def _set(self, r: Replica, state: ReplicaState, why: str) -> bool:
        """Change the state; True when it changed."""
        if r.state == state:
            return False
        r.state, r.changed_at = state, time.monotonic()
        if state == ReplicaState.DOWN:
            r.last_error = why
            log.warning("replica %s (%s) is down: %s", r.index, r.url, why)
        else:
            log.warning("replica %s (%s) is up again", r.index, r.url)
        return True

    def mark_down(self, r: Replica, why: str) -> None:
        """A request on `r` failed at the transport level: stop routing there until a health check passes."""
        if self._set(r, ReplicaState.DOWN, why) and r._wake is not None:
            r._wake.set()  # re-check on the short DOWN backoff from now, not after the UP interval

    def mark_up(self, r: Replica) -> None:
        """A request on `r` succeeded (it was tried while every replica was down)."""
        self._set(r, ReplicaState.UP, "")

    def pick(self, exclude: set[int] | None = None, up_only: bool = False) -> Replica | None:
        """The UP replica (not in `exclude`) with the fewest requests in flight, ties taken in turn. When no
        replica is UP: any replica not excluded (a single restarting server is tried as soon as asked),
        unless `up_only` (a retry goes to a healthy replica or nowhere). None when nothing is left."""
        self.started()
        free = [r for r in self.replicas if not exclude or r.index not in exclude]
        cands = [r for r in free if r.up] or ([] if up_only else free)
        if not cands:
            return None
        low = min(r.in_flight for r in cands)
        best = [r for r in cands if r.in_flight == low]
        return best[next(self._rr) % len(best)]

    async def check(self, r: Replica) -> bool:
        """One health check of `r`; updates its state."""
        definite = True  # the replica answered "not ready" or refused the connection
        try:
            ok = bool(await asyncio.wait_for(self._probe(r), self.policy.probe_timeout_s))
        except asyncio.CancelledError:
            raise
        except TimeoutError:  # no answer in time: maybe just a loaded host
            ok, definite = False, False
        except Exception:  # noqa: BLE001 - a probe that raises is a failed probe
            ok = False
        r.probed = True
        if ok:
            r.passed, r.streak = True, 0
            self._set(r, ReplicaState.UP, "")
        else:
            r.probe_failures += 1
            r.streak += 1
            # a definite "no" or a replica never healthy yet: down at once; timeouts: `down_after` in a row
            if definite or not r.passed or r.streak >= self.policy.down_after:
                why = "health check failed" if definite else f"health check timed out {r.streak} time(s) in a row"
                self._set(r, ReplicaState.DOWN, why)
        return ok

    async def check_all(self) -> bool:
        """Health-check every replica now; True when at least one is UP."""
        self.started()
        await asyncio.gather(*(self.check(r) for r in self.replicas))
        return self.any_up()

    async def ready(self, force: bool = False) -> bool:
        """True when at least one replica is UP (checked now when `force` or before any health check ended)."""
        self.started()
        if force or not all(r.probed for r in self.replicas):
            return await self.check_all()
        return self.any_up()

    async def _watch(self, r: Replica) -> None:
        p = self.policy
        r._wake = asyncio.Event()
        backoff = p.backoff_initial_s
        while True:
            delay = p.interval_s if r.up else backoff
            r._wake.clear()
            # asyncio.wait, not wait_for: on Python 3.10/3.11 wait_for drops a cancel that lands just as the
            # event is set (mark_down), and close() then waits for this task forever
            waiter = asyncio.ensure_future(r._wake.wait())
            try:
                done, _ = await asyncio.wait({waiter}, timeout=delay)
            finally:
                waiter.cancel()
            if waiter in done:
                backoff = p.backoff_initial_s  # marked down by a request: start the DOWN schedule now
                continue
            ok = await self.check(r)
            backoff = p.backoff_initial_s if ok else min(backoff * 2, p.backoff_max_s)

    def snapshot(self) -> list[ReplicaSnapshot]:
        return [ReplicaSnapshot(r.url, r.up, r.in_flight, r.requests, r.failures, r.retries, r.probe_failures)
                for r in self.replicas]
