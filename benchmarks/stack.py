"""Bring up the cpu-target serving stack for the benchmarks, the way a user does (README.md, "The flow"):

    checkpoint (data/tiny-trained, else a random `nemovl-build make-checkpoint --preset tiny`)
    → `nemovl-build engines --target cpu` → `nemovl-build repo` → tritonserver (TritonServer)
    → the OpenAI frontend (`nemovl serve --triton`, in its own process) pointed at Triton's gRPC port.

Build outputs go under .cache/bench/ (the engines build skips its up-to-date steps).
Every socket binds 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, WORK_DIR, free_port

TRAINED_CHECKPOINT = REPO_ROOT / "data" / "tiny-trained"
BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """A stage of the stack could not be built or started; the message says which and why."""


def _run(cmd: list[str], what: str, timeout_s: float = 600.0) -> float:
    """Run a build command; return its duration (s) or raise StackError with its output tail."""
    t0 = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise StackError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def _cli(name: str) -> str:
    exe = BIN / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def resolve_checkpoint(work: Path = WORK_DIR) -> tuple[Path, str]:
    """The checkpoint to serve and its kind: the trained tiny one when present, else a random one."""
    if (TRAINED_CHECKPOINT / "config.json").is_file():
        return TRAINED_CHECKPOINT, "tiny-trained"
    ckpt = work / "ckpt-random"
    if not (ckpt / "config.json").is_file():
        _run([_cli("nemovl-build"), "make-checkpoint", "--preset", "tiny", "--out", str(ckpt), "--seed", "0",
              "--force"], "make-checkpoint")
    return ckpt, "tiny-random"


@dataclass
class BuildInfo:
    """What was built and how long each step took (s)."""

    checkpoint: Path
    checkpoint_kind: str
    engines: Path
    repo: Path
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rel = {k: str(getattr(self, k).relative_to(REPO_ROOT)) if getattr(self, k).is_relative_to(REPO_ROOT)
               else str(getattr(self, k)) for k in ("checkpoint", "engines", "repo")}
        return {**rel, "checkpoint_kind": self.checkpoint_kind, "build_seconds": self.seconds}


def build(work: Path = WORK_DIR) -> BuildInfo:
    """Build engines and the Triton repository for the cpu target under `work`.

    `nemovl-build engines` skips its up-to-date steps, and the repository is regenerated every time
    (under a second), so a rerun picks up code changes without rebuilding what did not change.
    """
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt, kind = resolve_checkpoint(work)
    seconds = {"checkpoint": time.perf_counter() - t0}
    engines, repo = work / "engines-cpu", work / "triton_repo"
    seconds["engines"] = _run([_cli("nemovl-build"), "engines", "--target", "cpu", "--checkpoint", str(ckpt),
                               "--out", str(engines)], "nemovl-build engines")
    shutil.rmtree(repo, ignore_errors=True)
    seconds["repo"] = _run([_cli("nemovl-build"), "repo", "--engines", str(engines), "--out", str(repo)],
                           "nemovl-build repo")
    return BuildInfo(ckpt, kind, engines, repo, seconds)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"the frontend exited with status {proc.returncode} while starting.")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise StackError(f"{url} did not answer 200 within {timeout_s:.0f} s.")


class Frontend:
    """The OpenAI frontend as users run it: `nemovl serve --triton HOST:PORT` (uvicorn, one process) on
    127.0.0.1, log level warning."""

    def __init__(self, triton_grpc_url: str, port: int | None = None, log_path: Path | None = None) -> None:
        self.triton_grpc_url = triton_grpc_url
        self.port = port or free_port()
        self.log_path = log_path or (WORK_DIR / f"frontend-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The frontend's command line."""
        return [_cli("nemovl"), "serve", "--triton", self.triton_grpc_url, "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning"]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, ready_timeout_s: float = 60.0) -> Frontend:
        """Start `nemovl serve --triton ...` and wait for /v1/health/ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        log.close()
        try:
            _wait_http(f"http://127.0.0.1:{self.port}/v1/health/ready", ready_timeout_s, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the frontend process (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> Frontend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServeProcess:
    """`nemovl serve --repo REPO ARGS...` (tritonserver + frontend, supervised) in its own session on a free
    port, logs under WORK_DIR/<work>/; ready when /v1/health/ready answers 200. Stopped with SIGTERM (the
    drain), then SIGKILL of the whole process group."""

    def __init__(self, repo: Path, args: list[str], work: str, ready_timeout_s: float = 240.0) -> None:
        self.repo, self.args, self.port = repo, list(args), free_port()
        self.work = WORK_DIR / work
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / f"serve-{self.port}.log", "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([_cli("nemovl"), "serve", "--repo", str(self.repo), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-dir", str(self.work / "logs"),
                                      "--log-level", "warning", *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.work, start_new_session=True,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        log.close()
        try:
            _wait_http(self.url + "/v1/health/ready", self.ready_timeout_s, self.proc)
        except StackError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
