"""Prometheus metrics of the frontend, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

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

    def watch_replicas(self, snapshot: Callable[[], list[Any]]) -> None:
        """Export the replicas' state and traffic (`snapshot()` → ReplicaSnapshot list) at every scrape."""
        self.registry.register(ReplicaCollector(snapshot))

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


class ReplicaCollector(Collector):
    """Per-replica series, label `replica` = its gRPC HOST:PORT (nemovl_trt/server/replicas.py):
    `nemovl_replica_up` (1 UP, 0 DOWN), `nemovl_replica_in_flight`, and the counters
    `nemovl_replica_requests_total` (attempts routed there), `nemovl_replica_failures_total` (attempts that
    failed there at the transport level or with model not ready), `nemovl_replica_retries_total` (of those, the
    ones re-sent to another replica), `nemovl_replica_health_check_failures_total`."""

    def __init__(self, snapshot: Callable[[], list[Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snaps = self.snapshot()
        up = GaugeMetricFamily("nemovl_replica_up", "1 while the replica is up (healthy), 0 while down.",
                               labels=["replica"])
        busy = GaugeMetricFamily("nemovl_replica_in_flight", "Requests in flight on the replica.", labels=["replica"])
        counters = {name: CounterMetricFamily(f"nemovl_replica_{name}", text, labels=["replica"]) for name, text in (
            ("requests", "Requests routed to the replica (a retried request counts on both)."),
            ("failures", "Requests that failed on the replica at the transport level or with model not ready."),
            ("retries", "Requests that failed on the replica before their first token and were re-sent elsewhere."),
            ("health_check_failures", "Failed health checks of the replica."),
        )}
        for s in snaps:
            up.add_metric([s.url], 1.0 if s.up else 0.0)
            busy.add_metric([s.url], float(s.in_flight))
            counters["requests"].add_metric([s.url], float(s.requests))
            counters["failures"].add_metric([s.url], float(s.failures))
            counters["retries"].add_metric([s.url], float(s.retries))
            counters["health_check_failures"].add_metric([s.url], float(s.probe_failures))
        yield up
        yield busy
        yield from counters.values()
