"""What every route needs, created once per app: settings, metrics, the Triton pool, admission control,
the media policy and the shared HTTP client for media URLs."""

from __future__ import annotations

import asyncio
import time

import httpx

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.media import MediaPolicy
from nemovl_trt.server.metrics import Metrics
from nemovl_trt.server.schemas import ModelLimits
from nemovl_trt.server.settings import Settings
from nemovl_trt.server.triton_client import TritonPool


class Admission:
    """Bounded admission: `max_concurrent` requests run, `max_queued` wait, the rest get 429."""

    def __init__(self, max_concurrent: int, max_queued: int, retry_after_s: int, metrics: Metrics) -> None:
        self._sem = asyncio.Semaphore(max_concurrent)
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.waiting = 0
        self.active = 0
        self._metrics = metrics

    async def acquire(self) -> None:
        if self._sem.locked() and self.waiting >= self.max_queued:
            raise APIError(429, "The server is at capacity; retry shortly.", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.waiting += 1
        self._metrics.queue_depth.set(self.waiting)
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
            self._metrics.queue_depth.set(self.waiting)
        self.active += 1
        self._metrics.in_flight.set(self.active)

    def release(self) -> None:
        self.active -= 1
        self._metrics.in_flight.set(self.active)
        self._sem.release()


def _int_param(params: dict[str, str], key: str, default: int | None) -> int | None:
    try:
        return int(params[key])
    except (KeyError, ValueError):
        return default


class ServerState:
    """Everything a request handler needs, created once per app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool = TritonPool(settings.triton_urls, settings.triton_model, settings.triton_timeout_s,
                               settings.ready_cache_s, settings.replica_health)
        self.metrics.watch_replicas(self.pool.replicas.snapshot)
        self.admission = Admission(settings.max_concurrent, settings.max_queued, settings.retry_after_s, self.metrics)
        self.media_policy = MediaPolicy(settings.max_media_bytes, settings.media_timeout_s,
                                        settings.media_max_redirects, list(settings.allow_media_hosts))
        self.http: httpx.AsyncClient | None = None
        self.created = int(time.time())
        self.draining = False

    async def require_ready(self) -> None:
        if self.draining or not await self.pool.ready():
            raise APIError(503, "The model is not ready yet (Triton or a model in its repository is loading "
                                "or unavailable).", code="model_not_ready")

    def default_limits(self) -> ModelLimits:
        s = self.settings
        return ModelLimits(max_seq_len=None, max_images=s.default_max_images, max_num_tiles=s.default_max_num_tiles,
                           max_video_frames=s.default_max_video_frames)

    async def limits(self) -> ModelLimits:
        p = await self.pool.model_parameters()
        s = self.settings
        return ModelLimits(max_seq_len=_int_param(p, "max_seq_len", None),
                           max_images=_int_param(p, "max_images", s.default_max_images) or s.default_max_images,
                           max_num_tiles=_int_param(p, "max_num_tiles", s.default_max_num_tiles) or s.default_max_num_tiles,
                           max_video_frames=_int_param(p, "max_video_frames", s.default_max_video_frames)
                           or s.default_max_video_frames)
