"""Start and stop a real `tritonserver` for a model repository.

`find_tritonserver()` picks the binary on PATH, else the CPU build bundled in the `nvidia-pytriton`
wheel (tritonserver 2.51 + the Python backend, shared libraries in `nvidia_pytriton.libs/`).
`TritonServer` is a context manager that prepares a backends directory holding the Python backend
and the stub built for the running interpreter, starts the server in its own process group with the
environment the stub needs (docs/runtime-notes.md §2: venv `bin` first on PATH, LD_LIBRARY_PATH with the
interpreter's LIBDIR), waits for `/v2/health/ready`, forwards the log, and on exit stops the server
(SIGINT, then SIGKILL of the group) and removes the Python-backend shared-memory regions it left.

With `die_with_parent=True` the server is started through a two-line exec wrapper that sets
PR_SET_PDEATHSIG(SIGKILL) and then execs tritonserver (same pid), so the kernel kills it when the *thread*
that started it ends (normally: the process is SIGKILLed); the Python-backend stubs notice their parent is
gone and exit by themselves. No `preexec_fn` (unsafe in a threaded process). `stub_processes()` lists the
stubs with their model instance and shared-memory region (read from their command lines), which is what the
supervisor (nemovl_trt/serving/supervisor.py) watches.

Logs go to `log_path`, else `<log_dir>/tritonserver-<pid>-<port>.log` with `log_dir` defaulting to
`$NEMOVL_LOG_DIR` or `<tmp>/nemovl-<uid>/logs` (never the package tree or the checkout); the log file is
appended to, so a restarted server keeps its predecessor's log. The backends copy lives under
`$NEMOVL_CACHE/triton-backends` or `~/.cache/nemovl/triton-backends`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_NAME = "triton_python_backend_stub"
ENGINES_ENV = "NEMOVL_ENGINES_DIR"


class TritonLaunchError(RuntimeError):
    """tritonserver could not be found, prepared or started. The message says what to do."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of a tritonserver installation are."""

    binary: Path
    backends_src: Path | None  # directory holding python/libtriton_python.so (None: use the binary's default)
    stub: Path | None  # the Python-backend stub for this interpreter (None: already in backends_src)
    lib_dirs: tuple[Path, ...]  # extra LD_LIBRARY_PATH entries (the wheel's bundled libraries)


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # type: ignore[import-not-found]
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver: `tritonserver` on PATH (an NGC container), else the nvidia-pytriton wheel.

    Raises TritonLaunchError when neither exists.
    """
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        default_backends = Path("/opt/tritonserver/backends")
        return TritonInstall(binary=binary,
                             backends_src=default_backends if default_backends.is_dir() else None,
                             stub=None, lib_dirs=())
    root = _pytriton_root()
    if root is None:
        raise TritonLaunchError("tritonserver is not on PATH and the nvidia-pytriton package is not installed; "
                                "pip install 'nemovl-trt[cpu]' (make setup does), or use NVIDIA's Triton container.")
    server = root / "tritonserver"
    binary = server / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / STUB_NAME
    if not binary.is_file():
        raise TritonLaunchError(f"the nvidia-pytriton wheel has no tritonserver binary at {binary}.")
    if not stub.is_file():
        raise TritonLaunchError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {version}.")
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary=binary, backends_src=server / "backends", stub=stub,
                         lib_dirs=(libs,) if libs.is_dir() else ())


def prepare_backends(install: TritonInstall, cache_dir: Path) -> Path | None:
    """Build `<cache_dir>/backends/python/` with the Python backend and the stub of this interpreter.

    Files are copied (the wheel's RPATHs are relative, so the launcher puts the wheel's library
    directory on LD_LIBRARY_PATH instead). Returns the backends directory, or None to keep the
    server's default.
    """
    if install.backends_src is None:
        return None
    if install.stub is None:
        return install.backends_src
    dest = cache_dir / "backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    sources = [p for p in (install.backends_src / "python").iterdir() if p.is_file()] + [install.stub]
    for src in sources:
        target = dest / src.name
        if target.is_file() and target.stat().st_size == src.stat().st_size \
                and target.stat().st_mtime >= src.stat().st_mtime:
            continue
        tmp = dest / f".{src.name}.{os.getpid()}.tmp"
        shutil.copy2(src, tmp)
        os.replace(tmp, target)
    return dest.parent


def server_env(install: TritonInstall, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver and its stubs: the running venv's `bin` first on PATH (the stub
    runs the first `python3` it finds), LD_LIBRARY_PATH with the interpreter's LIBDIR (so the stub
    loads the matching libpython) and the wheel's bundled libraries."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR")
    parts = [str(p) for p in install.lib_dirs]
    if libdir:
        parts.append(str(libdir))
    if env.get("LD_LIBRARY_PATH"):
        parts.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_cache_dir() -> Path:
    """`$NEMOVL_CACHE/triton-backends`, else `$XDG_CACHE_HOME` (or `~/.cache`)`/nemovl/triton-backends`, else
    (no writable home, e.g. a container user) `<tmp>/nemovl-<uid>/triton-backends`."""
    if os.environ.get("NEMOVL_CACHE"):
        return Path(os.environ["NEMOVL_CACHE"]).resolve() / "triton-backends"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base).resolve() / "nemovl" / "triton-backends"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"nemovl-{os.getuid()}" / "triton-backends"  # no writable home


def default_log_dir() -> Path:
    """`$NEMOVL_LOG_DIR`, else `<tmp>/nemovl-<uid>/logs`."""
    if os.environ.get("NEMOVL_LOG_DIR"):
        return Path(os.environ["NEMOVL_LOG_DIR"]).resolve()
    return Path(tempfile.gettempdir()) / f"nemovl-{os.getuid()}" / "logs"


# Run as `python -S -c PDEATHSIG_EXEC PARENT_PID BINARY ARGS...`: ask the kernel for SIGKILL when the parent
# thread ends, give up if the parent already went away (the request would never fire), then become BINARY.
PDEATHSIG_EXEC = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,int(signal.SIGKILL),0,0,0)\n"  # 1 = PR_SET_PDEATHSIG
    "os.getppid()==int(sys.argv[1]) or os._exit(70)\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


def pdeathsig_command(cmd: list[str], parent_pid: int | None = None) -> list[str]:
    """`cmd` wrapped so that it is SIGKILLed when its parent (thread) dies; same pid as `cmd` after exec."""
    return [sys.executable, "-S", "-c", PDEATHSIG_EXEC, str(parent_pid or os.getpid()), *cmd]


def pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


@dataclass(frozen=True)
class StubProcess:
    """A Python-backend stub of a running server, from its command line."""

    pid: int
    model: str  # model name (the directory above the version)
    instance: str  # model instance name, e.g. "llm_0_0"
    shm: Path | None  # its shared-memory region under /dev/shm


def stub_info(pid: int) -> StubProcess | None:
    """Parse `/proc/<pid>/cmdline` of a stub: STUB MODEL_PATH SHM_NAME SIZE GROWTH PARENT_PID BACKEND_DIR
    IPC_TIMEOUT INSTANCE_NAME KIND (Triton 2.51); None when `pid` is not a stub."""
    try:
        argv = [a.decode("utf-8", "replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    if not argv or not argv[0].endswith(STUB_NAME) or len(argv) < 3:
        return None
    parts = Path(argv[1]).parts
    model = parts[-3] if len(parts) >= 3 else argv[1]
    instance = argv[8] if len(argv) > 8 else model
    shm = Path("/dev/shm") / argv[2] if argv[2].startswith(SHM_PREFIX) else None
    return StubProcess(pid=pid, model=model, instance=instance, shm=shm)


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of /proc/PID/stat after the command name) for every process still readable:
    fields[0] state, [1] ppid, [2] pgrp, ... [11] utime, [12] stime (clock ticks)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(entry.name), fields


def group_pids(pgid: int, include_zombies: bool = False) -> list[int]:
    """Process ids whose process group is `pgid` (the server and its stubs); exited-but-unreaped (zombie)
    processes are left out unless `include_zombies`."""
    pids = []
    for pid, fields in proc_stats():
        if int(fields[2]) == pgid and (include_zombies or fields[0] != "Z"):
            pids.append(pid)
    return pids


def shm_regions_mapped_by(pids: list[int]) -> set[Path]:
    """The Python-backend shared-memory regions (`/dev/shm/triton_python_backend_shm_region_*`, named by
    a UUID in 2.51, so not attributable by name) that the processes `pids` have mapped or open."""
    found: set[Path] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            idx = line.find(f"/dev/shm/{SHM_PREFIX}")
            if idx >= 0:
                found.add(Path(line[idx:].split(" (deleted)")[0].strip()))
    return found


class TritonServer:
    """A running tritonserver for `repo`; use as a context manager.

    Ports default to free loopback ports. `engines_dir` (optional) is passed to the models as
    NEMOVL_ENGINES_DIR and overrides the repository's `engines_dir` parameter. The server log goes
    to `log_path` (default `<log_dir>/tritonserver-<pid>-<http port>.log`, appended to) and, when `echo`
    is true, to stderr with a `[tritonserver] ` prefix. `start()` may be called again after `stop()`: the
    server comes back on the same ports (the supervisor restarts it this way).
    """

    def __init__(self, repo: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, *, host: str = "127.0.0.1",
                 engines_dir: str | Path | None = None, log_path: str | Path | None = None,
                 echo: bool = False, ready_timeout_s: float = 120.0, log_verbose: int = 0,
                 cache_dir: str | Path | None = None, extra_args: list[str] | None = None,
                 log_dir: str | Path | None = None, die_with_parent: bool = False) -> None:
        self.repo = Path(repo).resolve()
        if not (self.repo.is_dir()):
            raise TritonLaunchError(f"model repository {self.repo} does not exist.")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.engines_dir = Path(engines_dir).resolve() if engines_dir else None
        self.cache_dir = Path(cache_dir).resolve() if cache_dir else default_cache_dir()
        self.log_path = Path(log_path) if log_path else None
        self.log_dir = Path(log_dir).resolve() if log_dir else default_log_dir()
        self.die_with_parent = die_with_parent
        self.starts = 0
        self.echo = echo
        self.ready_timeout_s = ready_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._abort = threading.Event()
        self._log_thread: threading.Thread | None = None
        self._log_file: IO[bytes] | None = None
        self._tail: list[str] = []
        self._shm: set[Path] = set()

    # ---- addresses ----
    @property
    def http_url(self) -> str:
        """`host:port` of the HTTP endpoint (tritonclient style, no scheme)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """`host:port` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ---- lifecycle ----
    def command(self, backends_dir: Path | None, binary: Path) -> list[str]:
        """The tritonserver command line."""
        cmd = [str(binary), f"--model-repository={self.repo}",
               "--disable-auto-complete-config", "--exit-timeout-secs=5", "--strict-readiness=true",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
               f"--log-verbose={self.log_verbose}"]
        if backends_dir is not None:
            cmd.append(f"--backend-directory={backends_dir}")
        return cmd + self.extra_args

    def start(self) -> TritonServer:
        """Start the server and block until it is ready (or raise TritonLaunchError)."""
        install = find_tritonserver()
        backends = prepare_backends(install, self.cache_dir)
        extra = {ENGINES_ENV: str(self.engines_dir)} if self.engines_dir else {}
        env = server_env(install, extra)
        if self.log_path is None:
            self.log_path = self.log_dir / f"tritonserver-{os.getpid()}-{self.http_port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.starts += 1
        self._log_file.write(f"==== nemovl: tritonserver start #{self.starts} at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                             f"====\n".encode())
        t0 = time.monotonic()
        cmd = self.command(backends, install.binary)
        if self.die_with_parent:
            cmd = pdeathsig_command(cmd)
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(self.repo),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._log_thread = threading.Thread(target=self._pump_log, name="tritonserver-log", daemon=True)
        self._log_thread.start()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        self.track_shm()
        return self

    def track_shm(self) -> set[Path]:
        """Record the shared-memory regions the server's processes use now (removed at stop): those they
        have mapped and those named on the stubs' command lines."""
        if self.proc is not None:
            pids = group_pids(self.proc.pid)
            self._shm |= shm_regions_mapped_by(pids)
            self._shm |= {st.shm for st in self.stub_processes(pids) if st.shm is not None}
        return set(self._shm)

    def stub_processes(self, pids: list[int] | None = None) -> list[StubProcess]:
        """The live Python-backend stubs of this server (its process group, zombies left out)."""
        if self.proc is None:
            return []
        found = []
        for pid in pids if pids is not None else group_pids(self.proc.pid):
            if pid == self.proc.pid:
                continue
            info = stub_info(pid)
            if info is not None:
                found.append(info)
        return found

    def _pump_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            if self._log_file is not None and not self._log_file.closed:
                self._log_file.write(raw)
                self._log_file.flush()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._tail.append(line)
            del self._tail[:-200]
            if self.echo:
                sys.stderr.write(f"[tritonserver] {line}\n")

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the server log."""
        return "\n".join(self._tail[-n:])

    def is_ready(self) -> bool:
        """True when `/v2/health/ready` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the log pump catch the last lines
                raise TritonLaunchError(f"tritonserver exited with status {self.proc.returncode} while "
                                        f"starting; see {self.log_path}:\n{self.log_tail()}")
            if self.is_ready():
                return
            if self._abort.is_set():
                raise TritonLaunchError("tritonserver start-up was aborted (the server is stopping).")
            if time.monotonic() - t0 > self.ready_timeout_s:
                raise TritonLaunchError(f"tritonserver was not ready after {self.ready_timeout_s:.0f} s; "
                                        f"see {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def abort(self) -> None:
        """Make a `start()` that is waiting for readiness (in another thread) give up, and every later one."""
        self._abort.set()

    def wait(self) -> int:
        """Block until the server exits; returns its exit status."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server: SIGINT (graceful, waits for in-flight requests up to --exit-timeout-secs),
        then SIGKILL of the whole process group; remove its leftover shared-memory regions."""
        proc = self.proc
        if proc is None:
            return
        pid = proc.pid
        self.track_shm()
        if proc.poll() is None:
            try:
                os.killpg(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Stubs are in the server's process group; make sure none survives.
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while group_pids(pid) and time.monotonic() < deadline:  # SIGKILLed stubs take a moment to go
            time.sleep(0.05)
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
        for region in self._shm:
            try:
                region.unlink()
            except FileNotFoundError:
                pass
        self._shm = set()
        self.proc = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
