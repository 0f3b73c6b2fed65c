"""Click commands: `nemovl-build repo` (generate the Triton model repository) and `nemovl serve-triton`
(run a real tritonserver on it)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click


@click.command("repo")
@click.option("--engines", "engines", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Engines dir written by `nemovl-build engines` (holds manifest.json).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Repository directory to write.")
@click.option("--engines-ref", default=None,
              help="Value of the models' engines_dir parameter (default: ENGINES relative to OUT).")
@click.option("--preprocessor-instances", default=None, type=click.IntRange(1, 64),
              help="Preprocessor model instances (default: the build config's serving.preprocessor_instances "
                   "from the manifest, else 1).")
@click.option("--vision-instances", default=None, type=click.IntRange(1, 64),
              help="vision_encoder instances (per GPU on GPU targets; default: the build config's "
                   "serving.vision_instances from the manifest, else 1).")
@click.option("--video-pruning-rate", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Server default EVS rate for video requests (0 = off).")
@click.option("--video-decoder", default="cpu", show_default=True, type=click.Choice(["cpu", "nvdec"]),
              help="Video decoder of the preprocessor: cpu (FFmpeg via PyAV, bit-exact with the reference) or "
                   "nvdec (torchcodec on the GPU; needs torchcodec and a CUDA build of torch, not bit-identical; "
                   "the preprocessor refuses to load without them).")
def repo(engines: Path, out: Path, engines_ref: str | None, preprocessor_instances: int | None,
         vision_instances: int | None, video_pruning_rate: float, video_decoder: str) -> None:
    """Generate the Triton model repository for an engines dir."""
    from nemovl_trt.triton.generator import RepoError, RepoOptions, generate_repository, instance_counts
    from nemovl_trt.triton.models.common import MANIFEST_FILE, read_manifest
    from nemovl_trt.triton.pbtxt import ConfigError

    opts = RepoOptions(engines_ref=engines_ref, preprocessor_instances=preprocessor_instances,
                       vision_instances=vision_instances, video_pruning_rate=video_pruning_rate,
                       video_decoder=video_decoder)
    try:
        files = generate_repository(engines, out, opts)
        manifest = read_manifest(engines.resolve())
        pre, vis = instance_counts(manifest, opts)
    except (RepoError, ConfigError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # a manifest.json that is not JSON
        raise click.ClickException(f"{engines / MANIFEST_FILE}: {e}") from None

    def origin(given: int | None, option: str, key: str) -> str:
        if given is not None:
            return option
        return f"build config serving.{key}" if key in (manifest.get("serving") or {}) else "default"

    pre_from = origin(preprocessor_instances, "--preprocessor-instances", "preprocessor_instances")
    vis_from = origin(vision_instances, "--vision-instances", "vision_instances")
    click.echo(f"wrote {len(files)} files to {out}")
    click.echo(f"instances: preprocessor {pre} ({pre_from}), vision_encoder {vis} ({vis_from})")


@click.command("serve-triton")
@click.option("--repo", "repo_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model repository (e.g. triton_repo/).")
@click.option("--engines", "engines", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Engines dir; overrides the repository's engines_dir parameter.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--http-port", default=8000, show_default=True, type=int)
@click.option("--grpc-port", default=8001, show_default=True, type=int)
@click.option("--metrics-port", default=8002, show_default=True, type=int)
@click.option("--ready-timeout", default=180.0, show_default=True, type=float, help="Seconds to wait for ready.")
@click.option("--log-file", default=None, type=click.Path(dir_okay=False, path_type=Path))
def serve_triton(repo_dir: Path, engines: Path | None, host: str, http_port: int, grpc_port: int,
                 metrics_port: int, ready_timeout: float, log_file: Path | None) -> None:
    """Start tritonserver on a model repository; stop it cleanly on Ctrl-C / SIGTERM."""
    from nemovl_trt.triton.launcher import TritonLaunchError, TritonServer

    server = TritonServer(repo_dir, http_port, grpc_port, metrics_port, host=host, engines_dir=engines,
                          log_path=log_file, echo=True, ready_timeout_s=ready_timeout)
    stopping = {"sig": None}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["sig"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        click.echo(f"tritonserver ready in {server.startup_s:.1f} s: gRPC {server.grpc_url}, HTTP {server.http_url}, "
                   f"metrics {server.metrics_url}", err=True)
        code = server.wait()
        click.echo(f"tritonserver exited with status {code}.", err=True)
        server.stop()
        sys.exit(code or 1)
    except TritonLaunchError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("stopping tritonserver ...", err=True)
    finally:
        server.stop()
