"""Helpers of the fault, lifecycle and fuzz tests: a `nemovl serve --repo` subprocess on 127.0.0.1, the
processes and shared-memory regions of its tritonserver, SSE reading, and an in-process edge-wrapped
frontend over the session's tritonserver. Every loop here is bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nemovl_trt.triton.launcher import free_port, group_pids, pid_alive, stub_info

MODEL = "nvidia/nemotron-nano-12b-v2-vl"
NEMOVL = Path(sys.executable).parent / "nemovl"


def own_repository(engines_dir: Path, out: Path) -> Path:
    """A model repository of its own for a test's `nemovl serve` (so that its processes, found by the
    repository path on their command lines, are never confused with the session's tritonserver)."""
    from nemovl_trt.triton.generator import generate_repository

    generate_repository(engines_dir, out)
    return out


def processes_of(repo: Path) -> list[int]:
    """Live tritonserver / stub processes whose command line names `repo`."""
    out = []
    needle = str(repo).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in argv and (b"tritonserver" in argv.split(b"\0", 1)[0] or b"triton_python_backend_stub" in argv):
            if pid_alive(int(entry.name)):
                out.append(int(entry.name))
    return out


def wait_until(pred, timeout_s: float, step_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step_s)
    return bool(pred())


@dataclass
class ServeProcess:
    """`nemovl serve --repo REPO` in `workdir` (its cwd) on a free port, log to `log_dir`."""

    repo: Path
    workdir: Path
    args: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None
    out_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def start(self, ready_timeout_s: float = 240.0) -> ServeProcess:
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.workdir.parent / f"serve-{self.port}.out"
        out = open(self.out_path, "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([str(NEMOVL), "serve", "--repo", str(self.repo), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-dir", str(self.log_dir), *self.args],
                                     cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        out.close()
        if not wait_until(self.ready, ready_timeout_s, 0.2):
            tail = self.output()[-3000:]
            self.kill()
            raise RuntimeError(f"nemovl serve was not ready within {ready_timeout_s:.0f} s:\n{tail}")
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path and self.out_path.exists() else ""

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"nemovl serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        try:
            return httpx.get(self.url + "/v1/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def triton_pid(self) -> int | None:
        for pid in processes_of(self.repo):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
            if argv0.endswith(b"tritonserver") and os.getpgid(pid) == pid:
                try:
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(self.proc.pid):
                        return pid
                except OSError:
                    continue
        return None

    def stubs(self) -> dict[str, int]:
        ts = self.triton_pid()
        if ts is None:
            return {}
        found = {}
        for pid in group_pids(ts):
            info = stub_info(pid) if pid != ts else None
            if info is not None:
                found[info.model] = pid
        return found

    def shm_regions(self) -> set[Path]:
        ts = self.triton_pid()
        regions = set()
        for pid in group_pids(ts) if ts else []:
            info = stub_info(pid)
            if info is not None and info.shm is not None:
                regions.add(info.shm)
        return regions

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    @contextmanager
    def running(self) -> Iterator[ServeProcess]:
        """Started for the block, then killed; a block that ended normally also checks that no tritonserver
        or stub of the repository outlived it (a module fixture's teardown)."""
        self.start()
        try:
            yield self
        finally:
            self.kill()
        assert processes_of(self.repo) == []

    def kill(self) -> None:
        """Test teardown: SIGTERM, then SIGKILL; the children go with it (PDEATHSIG + watchdog)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        wait_until(lambda: not processes_of(self.repo), 30)


def chat_body(content: str = "hello", **kw: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


class Stream:
    """A streamed chat completion read in a thread: `events` are the `data:` payloads in order."""

    def __init__(self, url: str, body: dict, timeout_s: float = 120.0) -> None:
        self.events: list[str] = []
        self.status: int | None = None
        self.error: str | None = None
        self.started = threading.Event()
        self._t = threading.Thread(target=self._run, args=(url, body, timeout_s), daemon=True)
        self._t.start()

    def _run(self, url: str, body: dict, timeout_s: float) -> None:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=timeout_s) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        if len(self.events) >= 3:
                            self.started.set()
        except httpx.HTTPError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.started.set()

    def join(self, timeout_s: float) -> bool:
        self._t.join(timeout_s)
        return not self._t.is_alive()

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def error_event(self) -> dict | None:
        for e in self.events:
            if e.startswith('{"error"'):
                return json.loads(e)["error"]
        return None

    def finish_reason(self) -> str | None:
        for e in self.events:
            if e.startswith("{") and '"choices"' in e:
                for c in json.loads(e)["choices"]:
                    if c.get("finish_reason"):
                        return c["finish_reason"]
        return None


@contextmanager
def edge_frontend(grpc_url: str, **edge_kw) -> Iterator[str]:
    """The OpenAI app wrapped in the edge exactly as `nemovl serve` wires it, on uvicorn in a thread, in
    front of an already running tritonserver (the session's). Yields the root URL."""
    import uvicorn

    from nemovl_trt.server.app import create_app
    from nemovl_trt.server.commands import _limits_provider
    from nemovl_trt.server.settings import Settings
    from nemovl_trt.serving.edge import EdgeConfig, EdgeMiddleware
    from nemovl_trt.serving.openapi import openapi_document

    settings = Settings(triton_urls=[grpc_url], max_concurrent=4, max_queued=64)
    app = create_app(settings)
    edge = EdgeMiddleware(app, EdgeConfig(max_body_bytes=settings.max_body_bytes,
                                          openapi=openapi_document(MODEL, max_seq_len=8192), **edge_kw),
                          limits=_limits_provider(app, None))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(edge, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           interface="asgi3", timeout_graceful_shutdown=2))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    if not wait_until(lambda: server.started, 30, 0.02):
        raise RuntimeError("the edge frontend did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)
