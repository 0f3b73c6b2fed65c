"""Prometheus metrics of the frontend, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """All counters/histograms/gauges the frontend exports on /metrics (prefix `nemovl_`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("nemovl_requests", "Chat completion requests by HTTP status.",
                                ["status"], registry=r)
        self.latency = Histogram("nemovl_request_latency_seconds", "End-to-end request latency.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("nemovl_time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nemovl_inter_token_latency_seconds", "Time between streamed token responses.",
                             buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nemovl_prompt_tokens", "Prompt tokens (after image/video expansion).",
                                     registry=r)
        self.completion_tokens = Counter("nemovl_completion_tokens", "Generated tokens.", registry=r)
        self.images = Counter("nemovl_images", "Images received.", registry=r)
        self.tiles = Counter("nemovl_image_tiles", "Image tiles encoded (incl. thumbnails).", registry=r)
        self.frames = Counter("nemovl_video_frames", "Video frames sampled.", registry=r)
        self.evs_pruned = Counter("nemovl_evs_pruned_tokens", "Video tokens removed by EVS.", registry=r)
        self.queue_depth = Gauge("nemovl_queue_depth", "Requests waiting for a slot.", registry=r)
        self.in_flight = Gauge("nemovl_requests_in_flight", "Requests being served (sent to Triton).",
                               registry=r)
        self.cancelled = Counter("nemovl_requests_cancelled", "Requests cancelled by client disconnect.",
                                 registry=r)

    def observe_info(self, info: dict | None) -> None:
        """Count media from the entry model's `info` output."""
        if not info:
            return
        for key, counter in (("images", self.images), ("tiles", self.tiles), ("frames", self.frames),
                             ("evs_pruned_tokens", self.evs_pruned)):
            v = info.get(key)
            if isinstance(v, list):
                v = sum(x for x in v if isinstance(x, int | float))
            if isinstance(v, int | float) and v > 0:
                counter.inc(v)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
