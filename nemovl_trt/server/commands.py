"""`nemovl serve`: tritonserver (started and supervised here, or already running) + the OpenAI frontend.

Process layout with `--repo` (docs/api.md, "Faults and lifecycle"):
- `nemovl serve` (uvicorn in the main thread) wraps the app in the edge (nemovl_trt/serving/edge.py: request
  ids, API key, input guards, 503 + Retry-After while Triton restarts, request deadline, 500 containment);
- the supervisor thread (nemovl_trt/serving/supervisor.py) starts tritonserver, watches it and its stubs and
  restarts it on the same ports (at most --max-restarts-per-minute a minute);
- tritonserver runs in its own process group with PR_SET_PDEATHSIG(SIGKILL), so it cannot outlive
  `nemovl serve`, even a SIGKILLed one; a small watchdog process (nemovl_trt/serving/watchdog.py) then kills
  any stub left and removes the Python-backend shared memory;
- SIGTERM / SIGINT: drain in-flight requests for up to --shutdown-grace seconds, then stop tritonserver and
  every stub (DrainingServer, nemovl_trt/serving/lifecycle.py).

With `--replicas N` there are N tritonservers, each on its own ports with its own supervisor thread
(ReplicaGroup); with `--triton-url` (repeated) the frontend attaches to servers started elsewhere. Either way
the frontend routes each request to the least-loaded healthy replica and retries a request whose replica
failed before its first token once on another one (nemovl_trt/server/replicas.py, docs/replicas.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nemovl_trt.server.settings import DEFAULT_MODEL_NAME, Settings

if TYPE_CHECKING:
    from nemovl_trt.serving.supervisor import ReplicaGroup

MIB = 1024 * 1024


def _parse_endpoints(values: list[str], hint: str = "--triton") -> list[str]:
    """HOST:PORT (or grpc://HOST:PORT) items, comma-separated or repeated → ["HOST:PORT", ...]."""
    urls = []
    for value in values:
        for u in (x.strip() for x in value.split(",")):
            if not u:
                continue
            u = u.removeprefix("grpc://")
            host, _, port = u.rpartition(":")
            if not host or not port.isdigit() or "/" in u:
                raise click.BadParameter(f"'{u}' is not HOST:PORT.", param_hint=hint)
            if u in urls:
                raise click.BadParameter(f"'{u}' is given twice.", param_hint=hint)
            urls.append(u)
    return urls


def _start_replicas(repo: Path, engines_dir: Path | None, n: int, log_level: str, log_dir: Path | None,
                    max_restarts_per_minute: int, watchdog: Any) -> ReplicaGroup:
    """`n` supervised tritonservers on `repo`, each on its own free ports (and GPUs on a GPU target);
    returns the started ReplicaGroup. Errors are one-line ClickExceptions."""
    from nemovl_trt.serving.guards import repo_engines_dir
    from nemovl_trt.serving.supervisor import (
        ReplicaGroup,
        ReplicaPlanError,
        ReplicaServer,
        RestartPolicy,
        distinct_ports,
        replica_devices,
    )
    from nemovl_trt.triton.launcher import TritonLaunchError

    try:
        devices = replica_devices(n, repo_engines_dir(repo, engines_dir))
    except ReplicaPlanError as e:
        raise click.ClickException(str(e)) from e
    ports = distinct_ports(3 * n)
    servers = [ReplicaServer(repo, ports[3 * i], ports[3 * i + 1], ports[3 * i + 2], engines_dir=engines_dir,
                             echo=log_level == "debug", log_dir=log_dir, die_with_parent=True,
                             env={"CUDA_VISIBLE_DEVICES": dev} if dev is not None else None)
               for i, dev in enumerate(devices)]
    group = ReplicaGroup(servers, RestartPolicy(max_restarts_per_minute=max_restarts_per_minute),
                         watchdog=watchdog)
    try:
        group.start()
    except TritonLaunchError as e:
        raise click.ClickException(str(e).splitlines()[0]) from e
    for i, (srv, dev) in enumerate(zip(servers, devices, strict=True)):
        gpus = f", CUDA_VISIBLE_DEVICES={dev}" if dev is not None else ""
        click.echo(f"tritonserver{f' replica {i}' if n > 1 else ''} ready (gRPC {srv.grpc_url}{gpus}, "
                   f"log {srv.log_path}).", err=True)
    return group


def _setup_logging(level: str) -> None:
    logger = logging.getLogger("nemovl")
    if not any(getattr(h, "_nemovl", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s nemovl %(levelname)s %(name)s: %(message)s"))
        handler._nemovl = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    logger.propagate = False


def _limits_provider(app: Any, static: tuple[int | None, int] | None):
    """(max_seq_len, bytes_per_token) for the edge's cheap prompt bound: from the repository files when we
    started Triton, else from the app's model parameters once Triton answers (None until then)."""
    from nemovl_trt.serving.guards import DEFAULT_BYTES_PER_TOKEN

    cache: dict[str, tuple[int | None, int]] = {}

    async def limits() -> tuple[int | None, int]:
        if static is not None and static[0]:
            return static
        if "v" in cache:
            return cache["v"]
        try:
            lim = await app.state.nemovl.limits()
            value = (lim.max_seq_len, DEFAULT_BYTES_PER_TOKEN)
        except Exception:  # noqa: BLE001 - not known yet: the bound is skipped, Triton checks exactly
            return None, DEFAULT_BYTES_PER_TOKEN
        if value[0]:
            cache["v"] = value
        return value

    return limits


@click.command("serve")
@click.option("--repo", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Triton model repository to serve (starts and supervises tritonserver on it).")
@click.option("--triton", "triton", metavar="HOST:PORT[,HOST:PORT...]",
              help="Attach to running tritonserver gRPC endpoint(s) instead of starting one.")
@click.option("--triton-url", "triton_url", multiple=True, metavar="HOST:PORT",
              help="A running tritonserver gRPC endpoint (repeatable: one per replica); like --triton.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), metavar="N",
              help="With --repo: start N supervised tritonservers (cpu: N processes; GPU target: one per group "
                   "of world-size GPUs, CUDA_VISIBLE_DEVICES per replica) and route each request to the "
                   "least-loaded healthy one (docs/replicas.md).")
@click.option("--health-interval", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              metavar="SECONDS", help="Health-check period of a healthy replica (a down one is re-checked "
                                      "every 0.25-2 s).")
@click.option("--engines-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Engines directory for the repository's models (overrides the repository's setting).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the HTTP API listens on.")
@click.option("--port", default=8000, show_default=True, type=int, help="HTTP API port.")
@click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True, help="Model name clients send.")
@click.option("--api-key", envvar="NEMOVL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every /v1 route but /v1/health/* (env NEMOVL_API_KEY).")
@click.option("--allow-media-host", multiple=True, metavar="HOST|IP|CIDR",
              help="Allow fetching media from this private/loopback host (repeatable).")
@click.option("--max-concurrent", default=32, show_default=True, type=click.IntRange(1),
              help="Requests forwarded to Triton at once.")
@click.option("--max-queue", "--max-queued", "max_queued", default=128, show_default=True, type=click.IntRange(0),
              help="Requests waiting for a slot; beyond that 429 with Retry-After.")
@click.option("--request-timeout", default=None, type=click.FloatRange(0, min_open=True), metavar="SECONDS",
              help="Cut a chat request after this long: 504 (or an error event on a started stream), the engine's "
                   "work cancelled. Default: none (the 600 s stream limit).")
@click.option("--max-body-mb", default=64, show_default=True, type=click.IntRange(1),
              help="Request body cap (413 above).")
@click.option("--max-json-depth", default=64, show_default=True, type=click.IntRange(2, 512),
              help="Deepest array/object nesting accepted in a request body (400 above).")
@click.option("--shutdown-grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM/SIGINT, seconds in-flight requests may take before they are cancelled.")
@click.option("--max-restarts-per-minute", default=5, show_default=True, type=click.IntRange(1),
              help="Restarts of a failed tritonserver allowed in any 60 s (then it waits).")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where tritonserver's log goes (default $NEMOVL_LOG_DIR or <tmp>/nemovl-<uid>/logs).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(repo: Path | None, triton: str | None, triton_url: tuple[str, ...], replicas: int,
          health_interval: float, engines_dir: Path | None, host: str, port: int, model_name: str,
          api_key: str | None, allow_media_host: tuple[str, ...], max_concurrent: int, max_queued: int,
          request_timeout: float | None, max_body_mb: int, max_json_depth: int, shutdown_grace: float,
          max_restarts_per_minute: int, log_dir: Path | None, log_level: str) -> None:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/models, /metrics, ...) in front of Triton."""
    attach = [v for v in (triton, *triton_url) if v]
    if (repo is None) == (not attach):
        raise click.UsageError("Give exactly one of --repo REPO (start tritonserver) or --triton / --triton-url "
                               "HOST:PORT.")
    if replicas > 1 and repo is None:
        raise click.UsageError("--replicas starts tritonservers, so it needs --repo; with servers started "
                               "elsewhere give one --triton-url per replica.")
    urls = _parse_endpoints(attach, "--triton / --triton-url") if attach else []
    import uvicorn

    from nemovl_trt.server.app import create_app
    from nemovl_trt.serving.edge import EdgeConfig, EdgeMiddleware
    from nemovl_trt.serving.guards import served_limits
    from nemovl_trt.serving.lifecycle import DrainingServer
    from nemovl_trt.serving.openapi import openapi_document

    _setup_logging(log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nemovl_trt.server.replicas import HealthPolicy

    settings = Settings(model_name=model_name, api_key=api_key or None, allow_media_hosts=list(allow_media_host),
                        max_concurrent=max_concurrent, max_queued=max_queued, max_body_bytes=max_body_mb * MIB,
                        replica_health=HealthPolicy(interval_s=health_interval))

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM while tritonserver starts: unwind through the finally below

    previous = signal.signal(signal.SIGTERM, interrupt)
    supervisor = watchdog = None
    try:
        static_limits = None
        if repo is not None:
            from nemovl_trt.serving.watchdog import Watchdog

            click.echo(f"Starting {f'{replicas} tritonservers' if replicas > 1 else 'tritonserver'} on {repo} ...",
                       err=True)
            watchdog = Watchdog().start()
            supervisor = _start_replicas(repo, engines_dir, replicas, log_level, log_dir, max_restarts_per_minute,
                                         watchdog)
            settings.triton_urls = supervisor.grpc_urls
            static_limits = served_limits(repo, engines_dir)
        else:
            settings.triton_urls = urls
        app = create_app(settings)
        max_seq_len = static_limits[0] if static_limits else None
        edge = EdgeMiddleware(
            app, EdgeConfig(api_key=api_key or None, max_body_bytes=settings.max_body_bytes,
                            max_json_depth=max_json_depth, request_timeout_s=request_timeout,
                            retry_after_s=settings.retry_after_s,
                            openapi=openapi_document(model_name, max_seq_len=max_seq_len)),
            availability=supervisor.availability if supervisor else None,
            limits=_limits_provider(app, static_limits),
            extra_metrics=supervisor.render_metrics if supervisor else None)
        click.echo(f"OpenAI API on http://{host}:{port}/v1 (model '{model_name}'); Ctrl-C or SIGTERM stops "
                   f"{'both' if repo else 'it'}.", err=True)
        # uvicorn's access log (one line per request) only at debug: it cost the frontend per-request CPU
        config = uvicorn.Config(edge, host=host, port=port, log_level=log_level, lifespan="on", interface="asgi3",
                                timeout_graceful_shutdown=int(round(shutdown_grace)), access_log=log_level == "debug")

        def draining(_sig: int) -> None:
            edge.begin_drain(shutdown_grace)

        signal.signal(signal.SIGTERM, previous)
        DrainingServer(config, on_signal=draining).run()
        click.echo("frontend stopped; stopping tritonserver ..." if supervisor else "frontend stopped.", err=True)
    except KeyboardInterrupt:
        click.echo("interrupted; stopping ...", err=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        if supervisor is not None:
            supervisor.stop()
        if watchdog is not None:
            watchdog.close()
        signal.signal(signal.SIGTERM, previous)
