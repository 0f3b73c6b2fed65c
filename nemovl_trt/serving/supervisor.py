"""Supervision of the tritonserver that `nemovl serve --repo` starts.

`TritonSupervisor(server, policy, watchdog=...)` owns a `triton.launcher.TritonServer` as a watched child. One
long-lived thread starts it, watches it and restarts it; that same thread is the parent thread of every
tritonserver it starts, which matters for PR_SET_PDEATHSIG (the signal follows the parent *thread*).

Watched, every `policy.check_interval_s`:
- the server process: an exit is reaped at once (`Popen.poll`), so it never lingers as a zombie (a zombie
  parent also keeps its stubs from noticing that it is gone);
- every Python-backend stub seen at start-up: a stub that dies leaves tritonserver up and `/v2/health/ready`
  still 200 (measured on 2.51), but its in-flight requests hang and new ones fail ("Stub process 'llm_0_0' is
  not healthy"), so a dead stub makes the supervisor restart the server;
- `/v2/health/ready` (strict readiness: every model READY): `policy.unhealthy_after` failed probes in a row.

On a failure the state goes to RESTARTING (the frontend answers 503 `model_not_ready` with `Retry-After`): the
old server's process group is SIGKILLed (which also ends every stream in flight: the frontend's gRPC calls
fail with UNAVAILABLE and its SSE streams end with an error event), its shared-memory regions are removed,
and after a backoff (`backoff_initial_s` doubling up to `backoff_max_s`) the server starts again on the same
repository and ports. At most `max_restarts_per_minute` restarts happen in any 60 s; beyond that the
supervisor waits for the window (state stays RESTARTING, Retry-After tells how long). Every event is logged
(`nemovl.supervisor`) and counted (`render_metrics()`: `nemovl_triton_restarts_total{reason}`,
`nemovl_triton_up`, `nemovl_triton_last_recovery_seconds`).

`nemovl serve --replicas N` runs a `ReplicaGroup`: N servers on distinct free ports (`ReplicaServer`, which
adds `CUDA_VISIBLE_DEVICES` from `replica_devices()` on a GPU target), one supervisor each, started in
parallel, one metrics registry whose series carry a `replica` label (the server's gRPC HOST:PORT), and an
availability that serves while any replica is ready (docs/replicas.md).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from nemovl_trt.serving.edge import Availability
from nemovl_trt.triton.launcher import TritonLaunchError, TritonServer, free_port, pid_alive

log = logging.getLogger("nemovl.supervisor")
REASONS = ("stub_died", "server_exited", "unhealthy")
NVIDIA_SMI_TIMEOUT_S = 10.0


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # the first start failed (nothing to restart to)


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor watches and restarts."""

    check_interval_s: float = 0.25
    unhealthy_after: int = 3  # failed readiness probes in a row
    probe_every: int = 4  # probe readiness every N checks (the process checks run every check)
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    max_restarts_per_minute: int = 5
    ready_timeout_s: float = 180.0


class SupervisorMetrics:
    """Prometheus metrics of the supervisor (own registry, rendered into the frontend's /metrics). With
    `replicas` (the gRPC HOST:PORT of each, `nemovl serve --replicas N`), one registry holds every replica's
    series, told apart by a `replica` label."""

    def __init__(self, replicas: list[str] | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        extra = ["replica"] if replicas else []
        self.restarts = Counter("nemovl_triton_restarts", "tritonserver restarts by the supervisor, by reason.",
                                [*extra, "reason"], registry=r)
        self.failures = Counter("nemovl_triton_failures", "tritonserver failures seen, by kind.", [*extra, "kind"],
                                registry=r)
        self.up = Gauge("nemovl_triton_up", "1 while the supervised tritonserver is ready.", extra, registry=r)
        self.recovery = Gauge("nemovl_triton_last_recovery_seconds",
                              "Seconds from the last failure seen to ready again.", extra, registry=r)
        for replica in replicas or [None]:
            for reason in REASONS:  # exported as 0 from the start
                self.restart(reason, replica, 0)
                self.failure(reason, replica, 0)
            self.set_up(False, replica)

    @staticmethod
    def _labels(metric: Any, replica: str | None, **kw: str) -> Any:
        if replica is None:
            return metric.labels(**kw) if kw else metric
        return metric.labels(replica=replica, **kw)

    def restart(self, reason: str, replica: str | None = None, n: int = 1) -> None:
        self._labels(self.restarts, replica, reason=reason).inc(n)

    def failure(self, kind: str, replica: str | None = None, n: int = 1) -> None:
        self._labels(self.failures, replica, kind=kind).inc(n)

    def set_up(self, up: bool, replica: str | None = None) -> None:
        self._labels(self.up, replica).set(1 if up else 0)

    def set_recovery(self, seconds: float, replica: str | None = None) -> None:
        self._labels(self.recovery, replica).set(seconds)


class TritonSupervisor:
    """See the module docstring. `start()` blocks until the first server is ready (raises TritonLaunchError
    when it cannot start); `stop()` stops the server and the thread."""

    def __init__(self, server: TritonServer, policy: RestartPolicy | None = None, *, watchdog: Any = None,
                 on_state: Callable[[State], None] | None = None, metrics: SupervisorMetrics | None = None,
                 replica: str | None = None) -> None:
        self.server = server
        self.policy = policy or RestartPolicy()
        self.watchdog = watchdog
        self.on_state = on_state
        self.replica = replica  # the `replica` label of this server's series in a shared `metrics`
        self.metrics = metrics or SupervisorMetrics()
        self.state = State.STOPPED
        self.restarts = 0
        self.last_failure: str | None = None
        self.last_recovery_s: float | None = None
        self._restart_times: deque[float] = deque()
        self._stubs: dict[int, str] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._next_try_at = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def start(self) -> TritonSupervisor:
        return self.begin().wait_started()

    def begin(self) -> TritonSupervisor:
        """Start the supervision thread (which starts the server) without waiting for it."""
        self._set(State.STARTING)
        self._thread = threading.Thread(target=self._run, name=f"triton-supervisor-{self.replica or 0}",
                                        daemon=True)
        self._thread.start()
        return self

    def wait_started(self) -> TritonSupervisor:
        """Block until the first server is ready; raise its TritonLaunchError when it could not start."""
        assert self._thread is not None, "begin() first"
        while not self._ready.wait(0.2):
            if not self._thread.is_alive():
                break
        if self._start_error is not None:
            self._thread.join(timeout=30)
            raise self._start_error
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (SIGINT, then SIGKILL of its group, shared memory removed) and the thread."""
        self._stop.set()
        self.server.abort()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        with self._lock:
            self._stop_server()  # no-op when the thread already did it
        self._set(State.STOPPED)

    def availability(self) -> Availability:
        """For the frontend's edge: serve or not, and the Retry-After to send meanwhile."""
        st = self.state
        if st == State.READY:
            return Availability(True)
        wait = max(1, int(round(self._next_try_at - time.monotonic())) + 2) if st == State.RESTARTING else 2
        return Availability(False, min(wait, 60), f"tritonserver is {st.value}")

    def render_metrics(self) -> bytes:
        return generate_latest(self.metrics.registry)

    # ------------------------------------------------------------------ internals
    def _set(self, st: State) -> None:
        self.state = st
        self.metrics.set_up(st == State.READY, self.replica)
        if self.on_state is not None:
            try:
                self.on_state(st)
            except Exception:  # noqa: BLE001 - a callback must not stop supervision
                log.exception("state callback failed")

    def _announce(self) -> None:
        """Tell the watchdog about the running server's group and shared memory; remember the stubs."""
        srv = self.server
        regions = srv.track_shm()
        stubs = srv.stub_processes()
        self._stubs = {s.pid: s.instance for s in stubs}
        if self.watchdog is not None and srv.pid is not None:
            self.watchdog.watch_group(srv.pid)
            self.watchdog.watch_shm(regions)

    def _start_server(self) -> None:
        self.server.ready_timeout_s = self.policy.ready_timeout_s
        self.server.start()
        self._announce()

    def _stop_server(self) -> None:
        srv = self.server
        if srv.proc is None:
            return
        pgid = srv.pid
        regions = srv.track_shm()
        srv.stop()
        if self.watchdog is not None and pgid is not None:
            self.watchdog.forget_group(pgid)
            self.watchdog.forget_shm(regions)

    def _kill_server(self) -> None:
        """After a failure: no graceful stop (a broken server can take its exit timeout); kill the group."""
        srv = self.server
        if srv.proc is None:
            return
        pgid = srv.pid
        regions = srv.track_shm()
        srv.stop(timeout_s=0.0)
        if self.watchdog is not None and pgid is not None:
            self.watchdog.forget_group(pgid)
            self.watchdog.forget_shm(regions)

    def failure(self) -> str | None:
        """What is wrong with the running server now (None: healthy as far as the process checks go)."""
        proc = self.server.proc
        if proc is None:
            return "not running"
        code = proc.poll()  # reaps an exited server at once
        if code is not None:
            return f"tritonserver exited with status {code}"
        for pid, instance in self._stubs.items():
            if not pid_alive(pid):
                return f"the Python-backend stub of {instance} (pid {pid}) died"
        return None

    def _run(self) -> None:
        try:
            with self._lock:
                self._start_server()
        except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
            self._start_error = e
            self._set(State.FAILED)
            with self._lock:
                self._stop_server()
            self._ready.set()
            return
        log.info("tritonserver ready in %.1f s (pid %s)", self.server.startup_s or 0.0, self.server.pid)
        self._set(State.READY)
        self._ready.set()
        probe_failures = 0
        tick = 0
        while not self._stop.wait(self.policy.check_interval_s):
            tick += 1
            problem = self.failure()
            if problem is None and tick % self.policy.probe_every == 0:
                probe_failures = 0 if self.server.is_ready() else probe_failures + 1
                if probe_failures >= self.policy.unhealthy_after:
                    problem = f"/v2/health/ready failed {probe_failures} times in a row"
            if problem is None:
                continue
            probe_failures = 0
            self._recover(problem)
        self._set(State.STOPPING)
        with self._lock:
            self._stop_server()

    def _reason(self, problem: str) -> str:
        if "stub" in problem:
            return "stub_died"
        if "exited" in problem:
            return "server_exited"
        return "unhealthy"

    def _recover(self, problem: str) -> None:
        t_fail = time.monotonic()
        reason = self._reason(problem)
        self.last_failure = problem
        self.metrics.failure(reason, self.replica)
        log.error("%s; restarting tritonserver", problem)
        self._set(State.RESTARTING)
        with self._lock:
            self._kill_server()
        backoff = self.policy.backoff_initial_s
        while not self._stop.is_set():
            now = time.monotonic()
            while self._restart_times and now - self._restart_times[0] > 60.0:
                self._restart_times.popleft()
            wait = backoff
            if len(self._restart_times) >= self.policy.max_restarts_per_minute:
                wait = max(wait, 60.0 - (now - self._restart_times[0]))
                log.error("%d restarts in the last minute (limit %d); next try in %.0f s",
                          len(self._restart_times), self.policy.max_restarts_per_minute, wait)
            self._next_try_at = now + wait
            if self._stop.wait(wait):
                return
            self._restart_times.append(time.monotonic())
            self.restarts += 1
            self.metrics.restart(reason, self.replica)
            log.warning("restarting tritonserver (restart %d, same ports: gRPC %s, HTTP %s)", self.restarts,
                        self.server.grpc_url, self.server.http_url)
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._start_server()
            except TritonLaunchError as e:
                log.error("tritonserver restart failed: %s", str(e).splitlines()[0])
                with self._lock:
                    self._kill_server()
                backoff = min(backoff * 2, self.policy.backoff_max_s)
                continue
            self.last_recovery_s = time.monotonic() - t_fail
            self.metrics.set_recovery(self.last_recovery_s, self.replica)
            log.warning("tritonserver is back after %.1f s (%s)", self.last_recovery_s, problem)
            self._set(State.READY)
            return


# ---------------------------------------------------------------------------------------- several replicas
class ReplicaPlanError(ValueError):
    """`--replicas N` cannot be placed on this host; the message says why and what to do."""


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The GPU ids this process may use: `CUDA_VISIBLE_DEVICES` when set (ids or UUIDs, in order), else one
    id per line of `nvidia-smi -L`, else none."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def engines_plan(engines_dir: Path | None) -> tuple[bool | None, int]:
    """(the target runs on GPUs, GPUs per replica) from `<engines_dir>/manifest.json`: `target.gpu` and
    `parallel.world_size` (default 1). (None, 1) when there is no readable manifest."""
    if engines_dir is None:
        return None, 1
    try:
        data = json.loads((Path(engines_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, 1
    target = data.get("target")
    gpu = bool(target.get("gpu")) if isinstance(target, dict) and "gpu" in target else None
    parallel = data.get("parallel")
    ws = parallel.get("world_size", 1) if isinstance(parallel, dict) else 1
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise ReplicaPlanError(f"{engines_dir}/manifest.json has parallel.world_size {ws!r}; expected an "
                               f"integer >= 1 (rebuild the engines).")
    return gpu, ws


def replica_devices(n: int, engines_dir: Path | None, gpus: list[str] | None = None) -> list[str | None]:
    """`CUDA_VISIBLE_DEVICES` for each of `n` replicas (None: leave the environment alone). A GPU target
    gives replica i the GPUs [i*W, (i+1)*W) of the visible ones (W = the plan's world size) and refuses more
    replicas than fit; the cpu target runs `n` processes on the host."""
    if n < 1:
        raise ReplicaPlanError("--replicas must be at least 1.")
    gpu_target, ws = engines_plan(engines_dir)
    gpus = visible_gpus() if gpus is None else gpus
    if gpu_target is False or (gpu_target is None and not gpus):
        return [None] * n
    if n * ws > len(gpus):
        raise ReplicaPlanError(f"--replicas {n} needs {n} x {ws} GPU(s) (world size {ws} from the engines' "
                               f"manifest) but {len(gpus)} {'is' if len(gpus) == 1 else 'are'} visible"
                               f"{' (' + ','.join(gpus) + ')' if gpus else ''}; use --replicas "
                               f"{max(1, len(gpus) // ws)} or more GPUs.")
    if n == 1 and ws == len(gpus):
        return [None]  # the whole host: keep the environment as the user set it
    return [",".join(gpus[i * ws:(i + 1) * ws]) for i in range(n)]


class ReplicaServer(TritonServer):
    """A TritonServer whose process gets extra environment variables (`env`, e.g. CUDA_VISIBLE_DEVICES):
    the command is run through `env NAME=VALUE ...`, which execs tritonserver (same pid, so the parent-death
    signal and the process-group bookkeeping are unchanged)."""

    def __init__(self, *args: Any, env: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.env = dict(env or {})

    def command(self, backends_dir: Path | None, binary: Path) -> list[str]:
        cmd = super().command(backends_dir, binary)
        if not self.env:
            return cmd
        env_bin = shutil.which("env") or "/usr/bin/env"
        return [env_bin, *(f"{k}={v}" for k, v in self.env.items()), *cmd]


def distinct_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` currently free, pairwise different TCP ports (HTTP, gRPC and metrics of every replica)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port(host)
        if p not in ports:
            ports.append(p)
    return ports


class ReplicaGroup:
    """N supervised tritonservers on one repository (`nemovl serve --replicas N`): started together, each
    watched and restarted by its own TritonSupervisor, metrics in one registry with a `replica` label."""

    def __init__(self, servers: list[TritonServer], policy: RestartPolicy | None = None, *,
                 watchdog: Any = None) -> None:
        if not servers:
            raise ValueError("a replica group needs at least one server")
        labelled = len(servers) > 1
        self.metrics = SupervisorMetrics([s.grpc_url for s in servers] if labelled else None)
        self.supervisors = [TritonSupervisor(s, policy, watchdog=watchdog, metrics=self.metrics,
                                             replica=s.grpc_url if labelled else None) for s in servers]

    @property
    def grpc_urls(self) -> list[str]:
        return [s.server.grpc_url for s in self.supervisors]

    def start(self) -> ReplicaGroup:
        """Start every replica at once and wait for all; one that cannot start stops the others and raises
        its TritonLaunchError (prefixed with the replica)."""
        for sup in self.supervisors:
            sup.begin()
        for i, sup in enumerate(self.supervisors):
            try:
                sup.wait_started()
            except TritonLaunchError as e:
                self.stop()
                if len(self.supervisors) == 1:
                    raise
                raise TritonLaunchError(f"replica {i} (gRPC {sup.server.grpc_url}): {e}") from e
        return self

    def stop(self) -> None:
        """Stop every replica (in parallel: each stop can take the server's exit timeout)."""
        threads = [threading.Thread(target=s.stop, daemon=True) for s in self.supervisors]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def availability(self) -> Availability:
        """Serving while at least one replica is ready; else the soonest Retry-After of them."""
        states = [s.availability() for s in self.supervisors]
        if any(a.serving for a in states):
            return Availability(True)
        best = min(states, key=lambda a: a.retry_after_s)
        if len(states) == 1:
            return best
        return Availability(False, best.retry_after_s, f"no replica is ready ({best.reason})")

    def render_metrics(self) -> bytes:
        return generate_latest(self.metrics.registry)
