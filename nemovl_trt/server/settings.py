"""Frontend settings: one dataclass, filled by `nemovl serve` (CLI flags / environment)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nemovl_trt.server.replicas import HealthPolicy

DEFAULT_MODEL_NAME = "nvidia/nemotron-nano-12b-v2-vl"


@dataclass
class Settings:
    """Everything `create_app` needs. Sizes are bytes, times seconds."""

    triton_urls: list[str] = field(default_factory=lambda: ["127.0.0.1:8001"])  # gRPC HOST:PORT list
    triton_model: str = "nemovl"  # entry model in the Triton repository
    model_name: str = DEFAULT_MODEL_NAME  # the name clients send in `model`
    api_key: str | None = None  # when set, /v1 inference routes need `Authorization: Bearer <key>`
    allow_media_hosts: list[str] = field(default_factory=list)  # hostnames, IPs or CIDRs exempt from the SSRF guard
    max_body_bytes: int = 64 * 1024 * 1024  # request body cap → 413
    max_media_bytes: int = 48 * 1024 * 1024  # per fetched image/video
    media_timeout_s: float = 15.0  # whole fetch (connect + read) per URL
    media_max_redirects: int = 3
    max_concurrent: int = 32  # requests forwarded to Triton at once
    max_queued: int = 128  # requests waiting for a slot; beyond → 429
    retry_after_s: int = 1  # Retry-After on 429
    # Fallback limits until Triton's model-config parameters are read (the real values win).
    default_max_images: int = 4
    default_max_num_tiles: int = 12
    default_max_video_frames: int = 128
    triton_timeout_s: float = 600.0  # a whole generation stream
    ready_cache_s: float = 1.0  # how long a readiness probe result is reused (the UP health-check period)
    # Replica health checks and retry (docs/replicas.md); None: HealthPolicy(interval_s=ready_cache_s).
    replica_health: HealthPolicy | None = None
