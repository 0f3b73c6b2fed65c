"""`nemovl serve`: tritonserver (started here, or already running) + the OpenAI frontend on uvicorn."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from nemovl_trt.server.settings import DEFAULT_MODEL_NAME, Settings

MIB = 1024 * 1024


def _parse_endpoints(value: str) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    for u in urls:
        host, _, port = u.rpartition(":")
        if not host or not port.isdigit():
            raise click.BadParameter(f"'{u}' is not HOST:PORT.", param_hint="--triton")
    return urls


@click.command("serve")
@click.option("--repo", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Triton model repository to serve (starts tritonserver on it).")
@click.option("--triton", "triton", metavar="HOST:PORT[,HOST:PORT...]",
              help="Attach to running tritonserver gRPC endpoint(s) instead of starting one.")
@click.option("--engines-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Engines directory for the repository's models (overrides the repository's setting).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the HTTP API listens on.")
@click.option("--port", default=8000, show_default=True, type=int, help="HTTP API port.")
@click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True, help="Model name clients send.")
@click.option("--api-key", envvar="NEMOVL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 inference routes (env NEMOVL_API_KEY).")
@click.option("--allow-media-host", multiple=True, metavar="HOST|IP|CIDR",
              help="Allow fetching media from this private/loopback host (repeatable).")
@click.option("--max-concurrent", default=32, show_default=True, type=int,
              help="Requests forwarded to Triton at once.")
@click.option("--max-queued", default=128, show_default=True, type=int,
              help="Requests waiting for a slot before new ones get 429.")
@click.option("--max-body-mb", default=64, show_default=True, type=int, help="Request body cap (413 above).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(repo: Path | None, triton: str | None, engines_dir: Path | None, host: str, port: int, model_name: str,
          api_key: str | None, allow_media_host: tuple[str, ...], max_concurrent: int, max_queued: int,
          max_body_mb: int, log_level: str) -> None:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/models, /metrics, ...) in front of Triton."""
    if (repo is None) == (triton is None):
        raise click.UsageError("Give exactly one of --repo REPO (start tritonserver) or --triton HOST:PORT.")
    import uvicorn

    from nemovl_trt.server.app import create_app

    settings = Settings(model_name=model_name, api_key=api_key or None, allow_media_hosts=list(allow_media_host),
                        max_concurrent=max_concurrent, max_queued=max_queued, max_body_bytes=max_body_mb * MIB)
    with contextlib.ExitStack() as stack:
        if repo is not None:
            from nemovl_trt.triton.launcher import TritonLaunchError, TritonServer

            click.echo(f"Starting tritonserver on {repo} ...", err=True)
            try:
                ts = stack.enter_context(TritonServer(repo, engines_dir=engines_dir, echo=log_level == "debug"))
            except TritonLaunchError as e:
                raise click.ClickException(str(e).splitlines()[0]) from e
            click.echo(f"tritonserver ready (gRPC {ts.grpc_url}, log {ts.log_path}).", err=True)
            settings.triton_urls = [ts.grpc_url]
        else:
            settings.triton_urls = _parse_endpoints(triton or "")
        click.echo(f"OpenAI API on http://{host}:{port}/v1 (model '{model_name}'); Ctrl-C stops "
                   f"{'both' if repo else 'it'}.", err=True)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, lifespan="on",
                    timeout_graceful_shutdown=5)
