"""Session fixtures of the triton area: `triton_repo_dir` (a repository generated from `cpu_engines_dir`)
and `triton_server` (a real tritonserver on free loopback ports serving it)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class RunningTriton:
    """What tests get from `triton_server`."""

    grpc_url: str  # "127.0.0.1:PORT"
    http_url: str  # "127.0.0.1:PORT"
    metrics_url: str
    repo: Path
    engines_dir: Path
    startup_s: float
    server: object  # nemovl_trt.triton.launcher.TritonServer


@pytest.fixture(scope="session")
def triton_repo_dir(cpu_engines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository for the cpu engines, generated into a temp dir (engines_dir parameter relative)."""
    from nemovl_trt.triton.generator import generate_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    generate_repository(cpu_engines_dir, out)
    return out


@pytest.fixture(scope="session")
def triton_server(triton_repo_dir: Path, cpu_engines_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real tritonserver on the generated repository; stopped (no stray process / shm) at session end."""
    from nemovl_trt.triton.launcher import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    t0 = time.monotonic()
    server = TritonServer(triton_repo_dir, log_path=log, echo=bool(os.environ.get("NEMOVL_TRITON_ECHO")),
                          ready_timeout_s=240)
    server.start()
    sys.stderr.write(f"\n[triton_server] ready in {time.monotonic() - t0:.1f} s (log {log})\n")
    try:
        yield RunningTriton(grpc_url=server.grpc_url, http_url=server.http_url, metrics_url=server.metrics_url,
                            repo=triton_repo_dir, engines_dir=cpu_engines_dir, startup_s=server.startup_s or 0.0,
                            server=server)
    finally:
        server.stop()
