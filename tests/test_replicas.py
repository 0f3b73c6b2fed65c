"""The replica set and the pool's failover (nemovl_trt/server/replicas.py, TritonPool.generate):

- routing: least in flight among UP replicas, ties in turn, DOWN ones skipped, every replica DOWN → any,
  a retry only to an UP replica not tried yet;
- health: a failing check marks a replica DOWN and counts; a passing one brings it back; a request's
  mark-down re-checks on the short DOWN backoff (not after the long UP interval);
- failover against a real tritonserver (the session's `triton_server`): a replica that refuses connections
  before the first token → the request is retried on the other one and answered; a replica whose connection
  is cut (a real TCP proxy in front of tritonserver) after the first chunk → APIError 503 and no retry; the
  proxy listening again → the replica is UP again and takes traffic;
- `--replicas` placement: CUDA_VISIBLE_DEVICES per replica from the plan's world size, more replicas than
  GPUs refused with one clear line; the replica-labelled supervisor metrics.

Every wait is bounded; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.replicas import HealthPolicy, ReplicaSet, ReplicaState
from nemovl_trt.server.triton_client import TritonPool, TritonRequest
from tests.fixtures_server import free_port

FAST = HealthPolicy(interval_s=0.05, backoff_initial_s=0.02, backoff_max_s=0.1, probe_timeout_s=2.0)
WAIT_S = 15.0


class Health:
    """The health of endpoints without servers: `ok[url]` True / False, or "slow" (the check times out)."""

    def __init__(self, urls: list[str]) -> None:
        self.ok: dict[str, bool | str] = {u: True for u in urls}
        self.calls: list[str] = []

    async def probe(self, rep) -> bool:
        self.calls.append(rep.url)
        if self.ok[rep.url] == "slow":
            raise TimeoutError("no answer")
        return bool(self.ok[rep.url])


def replica_set(n: int, policy: HealthPolicy = FAST) -> tuple[ReplicaSet, Health]:
    urls = [f"10.0.0.{i + 1}:8001" for i in range(n)]
    health = Health(urls)
    return ReplicaSet(urls, health.probe, connect=lambda url: None, policy=policy), health


async def until(pred, timeout_s: float = WAIT_S, step_s: float = 0.01) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if pred():
            return True
        await asyncio.sleep(step_s)
    return bool(pred())


def test_routing_picks_the_least_loaded_up_replica() -> None:
    async def go() -> None:
        rs, _ = replica_set(3, HealthPolicy(interval_s=60))
        a, b, c = rs.started()
        a.in_flight, b.in_flight, c.in_flight = 2, 1, 3
        assert rs.pick() is b
        b.state = ReplicaState.DOWN  # busier replicas win over a DOWN one
        assert rs.pick() is a
        assert rs.pick(exclude={a.index}) is c
        a.in_flight = c.in_flight = 0
        assert [rs.pick().url for _ in range(4)] in ([a.url, c.url] * 2, [c.url, a.url] * 2)  # ties in turn
        assert rs.pick(exclude={a.index, c.index}, up_only=True) is None  # a retry never goes to a DOWN one
        a.state = c.state = ReplicaState.DOWN
        assert rs.pick() is not None  # all DOWN: try one rather than refuse (a restarting single server)
        assert rs.pick(up_only=True) is None
        assert rs.any_up() is False
        await rs.close()

    asyncio.run(go())


def test_health_checks_mark_down_and_bring_back() -> None:
    async def go() -> None:
        rs, health = replica_set(2)
        a, b = rs.started()
        assert await rs.ready() is True and a.probed and b.probed
        health.ok[a.url] = False
        assert await until(lambda: a.state == ReplicaState.DOWN)
        assert a.probe_failures >= 1 and a.last_error == "health check failed" and b.up
        assert {rs.pick().url for _ in range(6)} == {b.url}  # nothing routed to the DOWN replica
        health.ok[b.url] = False
        assert await until(lambda: not rs.any_up())
        assert await rs.ready() is False
        health.ok[a.url] = True
        assert await until(lambda: a.up)
        assert rs.pick() is a and await rs.ready() is True
        snap = {s.url: s for s in rs.snapshot()}
        assert snap[a.url].up and not snap[b.url].up and snap[b.url].probe_failures >= 1
        await rs.close()

    asyncio.run(go())


def test_a_request_failure_rechecks_on_the_short_down_backoff() -> None:
    async def go() -> None:
        # UP replicas are checked every 60 s; a request's mark-down must not wait for that
        rs, health = replica_set(2, HealthPolicy(interval_s=60, backoff_initial_s=0.02, backoff_max_s=0.1))
        a, _b = rs.started()
        assert await rs.ready(force=True)
        calls = len(health.calls)
        rs.mark_down(a, "gRPC UNAVAILABLE: connection refused")
        assert a.state == ReplicaState.DOWN and a.last_error.startswith("gRPC UNAVAILABLE")
        assert await until(lambda: a.up)  # the re-check after backoff_initial_s found it healthy
        assert health.calls[calls:].count(a.url) >= 1
        await rs.close()

    asyncio.run(go())


def test_close_right_after_a_mark_down_returns() -> None:
    """A cancel that lands just as a mark-down wakes the watcher must still stop it (asyncio.wait_for on
    Python 3.11 dropped it and close() hung)."""
    async def go() -> bool:
        rs, _ = replica_set(2, HealthPolicy(interval_s=60, backoff_initial_s=0.02, backoff_max_s=0.1))
        a, _b = rs.started()
        await asyncio.sleep(0.05)  # both watchers are waiting on their wake event
        rs.mark_down(a, "gRPC UNAVAILABLE: connection refused")
        closing = asyncio.ensure_future(rs.close())
        done, _ = await asyncio.wait({closing}, timeout=WAIT_S)
        return closing in done

    assert asyncio.run(go()), "ReplicaSet.close() did not return"


def test_one_slow_check_does_not_take_a_healthy_replica_down() -> None:
    async def go() -> None:
        rs, health = replica_set(1, HealthPolicy(interval_s=60, down_after=2))
        (a,) = rs.started()
        assert await rs.check(a) is True
        health.ok[a.url] = "slow"
        assert await rs.check(a) is False and a.up and a.streak == 1  # one timeout: still UP
        assert await rs.check(a) is False and not a.up  # two in a row: DOWN
        assert a.last_error == "health check timed out 2 time(s) in a row"
        health.ok[a.url] = True
        assert await rs.check(a) is True and a.up and a.streak == 0
        health.ok[a.url] = False
        assert await rs.check(a) is False and not a.up  # a definite "not ready": DOWN at once
        fresh, h2 = replica_set(1, HealthPolicy(interval_s=60, down_after=5))
        h2.ok[fresh.replicas[0].url] = "slow"
        assert await fresh.ready() is False  # never healthy: DOWN at the first failed check
        await rs.close()
        await fresh.close()

    asyncio.run(go())


def test_policy_and_endpoint_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        HealthPolicy(interval_s=0)
    with pytest.raises(ValueError, match="at least backoff_initial_s"):
        HealthPolicy(backoff_initial_s=1, backoff_max_s=0.5)
    with pytest.raises(ValueError, match="down_after"):
        HealthPolicy(down_after=0)
    with pytest.raises(ValueError, match="twice"):
        ReplicaSet(["h:1", "h:1"], Health(["h:1"]).probe, connect=lambda u: None)
    with pytest.raises(ValueError, match="At least one"):
        ReplicaSet([], Health([]).probe, connect=lambda u: None)


# ------------------------------------------------------------------------------ against a real tritonserver
class TcpProxy:
    """A real TCP proxy on 127.0.0.1 in front of `target`: `cut()` aborts every connection and stops
    listening (what a killed server looks like to the client); `listen()` accepts again on the same port."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task] = set()
        self.down_bytes = 0  # relayed from the server to the client (grows while a generation streams)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: bool = False) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if down:
                    self.down_bytes += len(data)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for t in (asyncio.ensure_future(self._pipe(reader, up_writer)),
                  asyncio.ensure_future(self._pipe(up_reader, writer, down=True))):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for w in self.writers:
            w.transport.abort()  # RST, like a SIGKILLed process's sockets
        self.writers = []
        for t in list(self.tasks):
            t.cancel()


def _request(max_tokens: int, **params: object) -> TritonRequest:
    return TritonRequest(messages=[{"role": "user", "content": "Tell a long story."}],
                         params={"max_tokens": max_tokens, "temperature": 0.0, **params})


async def _collect(gen) -> tuple[str, list]:
    chunks = [c async for c in gen]
    return "".join(c.text for c in chunks), chunks


@pytest.mark.integration
def test_refused_before_the_first_token_is_retried_on_another_replica(triton_server) -> None:
    async def go() -> None:
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
        pool = TritonPool([dead, triton_server.grpc_url], "nemovl", 60, health=HealthPolicy(interval_s=60))
        a, b = pool.replicas.started()
        assert a.up and b.up  # not checked yet: the first request goes to the dead one (index 0 first)
        text, chunks = await _collect(pool.generate(_request(4), "retry-1"))
        assert chunks and chunks[-1].finish_reason in ("stop", "length") and chunks[-1].completion_tokens >= 1
        assert (a.requests, a.failures, a.retries, a.state) == (1, 1, 1, ReplicaState.DOWN)
        assert (b.requests, b.failures, b.retries, b.state) == (1, 0, 0, ReplicaState.UP)
        assert "UNAVAILABLE" in a.last_error
        # the next request goes straight to the healthy replica
        await _collect(pool.generate(_request(2), "retry-2"))
        assert (a.requests, b.requests) == (1, 2) and pool.in_flight == 0
        await pool.close()

    asyncio.run(go())


@pytest.mark.integration
def test_every_replica_refusing_gives_503_after_one_retry() -> None:
    async def go() -> None:
        pool = TritonPool([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], "nemovl", 10,
                          health=HealthPolicy(interval_s=60))
        a, b = pool.replicas.started()
        with pytest.raises(APIError) as e:
            await _collect(pool.generate(_request(2), "none"))
        assert (e.value.status, e.value.code) == (503, "model_not_ready")
        assert (a.requests + b.requests, a.failures + b.failures, a.retries + b.retries) == (2, 2, 1)
        assert await pool.ready() is False and pool.in_flight == 0
        await pool.close()

    asyncio.run(go())


@pytest.mark.integration
def test_cut_after_the_first_chunk_is_not_retried_and_the_replica_comes_back(triton_server) -> None:
    async def go() -> None:
        proxy = TcpProxy(triton_server.grpc_url)
        await proxy.listen()
        pool = TritonPool([proxy.url, triton_server.grpc_url], "nemovl", 120, health=FAST)
        assert await pool.ready(force=True)
        a, b = pool.replicas.started()
        gen = pool.generate(_request(4000, ignore_eos=True), "cut-1")
        first = await gen.__anext__()  # went to the proxied replica (both idle: index 0 first)
        assert (a.in_flight, b.in_flight) == (1, 0) and first.prompt_tokens > 0
        await proxy.cut()
        with pytest.raises(APIError) as e:
            async for _ in gen:
                pass
        assert (e.value.status, e.value.code) == (503, "model_not_ready")
        assert (a.failures, a.retries, b.requests) == (1, 0, 0)  # a token had gone out: never re-sent
        assert a.state == ReplicaState.DOWN
        await proxy.listen()  # the "restarted" replica
        assert await until(lambda: a.up), "the replica did not come back after its port listened again"
        await _collect(pool.generate(_request(2), "cut-2"))
        await _collect(pool.generate(_request(2), "cut-3"))
        assert a.requests == 2 and b.requests == 1  # it takes traffic again (ties alternate)
        assert pool.in_flight == 0
        await pool.close()
        await proxy.cut()

    asyncio.run(go())


# ------------------------------------------------------------------------------------------- --replicas
def _engines(tmp_path: Path, gpu: bool, parallel: object = None) -> Path:
    manifest: dict[str, object] = {"target": {"name": "h100" if gpu else "cpu", "gpu": gpu}}
    if parallel is not None:
        manifest["parallel"] = parallel
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_replica_devices_follow_the_plan(tmp_path: Path) -> None:
    from nemovl_trt.serving.supervisor import ReplicaPlanError, replica_devices, visible_gpus

    cpu = _engines(tmp_path / "cpu", gpu=False)
    assert replica_devices(3, cpu, gpus=["0", "1"]) == [None, None, None]  # cpu: N host processes
    one = _engines(tmp_path / "g1", gpu=True)
    assert replica_devices(4, one, gpus=["0", "1", "2", "3"]) == ["0", "1", "2", "3"]
    two = _engines(tmp_path / "g2", gpu=True, parallel={"world_size": 2})
    assert replica_devices(2, two, gpus=["4", "5", "6", "7"]) == ["4,5", "6,7"]
    assert replica_devices(1, two, gpus=["0", "1"]) == [None]  # the whole host: environment untouched
    with pytest.raises(ReplicaPlanError) as e:
        replica_devices(3, two, gpus=["0", "1", "2", "3"])
    assert str(e.value).startswith("--replicas 3 needs 3 x 2 GPU(s)") and "--replicas 2" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ReplicaPlanError, match="world_size"):
        replica_devices(1, _engines(tmp_path / "bad", gpu=True, parallel={"world_size": 0}), gpus=["0"])
    with pytest.raises(ReplicaPlanError, match="needs 2 x 1 GPU"):
        replica_devices(2, one, gpus=[])
    assert replica_devices(2, None, gpus=[]) == [None, None]  # no manifest, no GPU: host processes
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_replica_server_command_sets_the_environment(tmp_path: Path) -> None:
    from nemovl_trt.serving.supervisor import ReplicaServer

    (tmp_path / "repo").mkdir()
    srv = ReplicaServer(tmp_path / "repo", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    cmd = srv.command(None, Path("/opt/tritonserver/bin/tritonserver"))
    assert Path(cmd[0]).name == "env" and cmd[1] == "CUDA_VISIBLE_DEVICES=2,3"
    assert cmd[2] == "/opt/tritonserver/bin/tritonserver" and f"--grpc-port={srv.grpc_port}" in cmd
    plain = ReplicaServer(tmp_path / "repo").command(None, Path("/x/tritonserver"))
    assert plain[0] == "/x/tritonserver"


def test_supervisor_metrics_with_a_replica_label() -> None:
    from prometheus_client import generate_latest

    from nemovl_trt.serving.supervisor import SupervisorMetrics

    m = SupervisorMetrics(["127.0.0.1:1", "127.0.0.1:2"])
    m.restart("server_exited", "127.0.0.1:2")
    m.set_up(True, "127.0.0.1:1")
    text = generate_latest(m.registry).decode()
    assert 'nemovl_triton_restarts_total{reason="server_exited",replica="127.0.0.1:2"} 1.0' in text
    assert 'nemovl_triton_restarts_total{reason="server_exited",replica="127.0.0.1:1"} 0.0' in text
    assert 'nemovl_triton_up{replica="127.0.0.1:1"} 1.0' in text and 'nemovl_triton_up{replica="127.0.0.1:2"} 0.0' in text
    single = generate_latest(SupervisorMetrics().registry).decode()
    assert "nemovl_triton_up 0.0" in single and "replica=" not in single  # one server: unchanged names


def test_metrics_show_every_replica() -> None:
    from nemovl_trt.server.metrics import Metrics

    rs, _ = replica_set(2, HealthPolicy(interval_s=60))
    a, b = rs.replicas
    a.requests, a.failures, a.retries, b.in_flight = 5, 2, 1, 3
    b.state = ReplicaState.DOWN
    m = Metrics()
    m.watch_replicas(rs.snapshot)
    text = m.render().decode()
    for line in (f'nemovl_replica_up{{replica="{a.url}"}} 1.0', f'nemovl_replica_up{{replica="{b.url}"}} 0.0',
                 f'nemovl_replica_requests_total{{replica="{a.url}"}} 5.0',
                 f'nemovl_replica_failures_total{{replica="{a.url}"}} 2.0',
                 f'nemovl_replica_retries_total{{replica="{a.url}"}} 1.0',
                 f'nemovl_replica_in_flight{{replica="{b.url}"}} 3.0',
                 f'nemovl_replica_health_check_failures_total{{replica="{b.url}"}} 0.0'):
        assert line in text, line


def test_serve_flag_errors_are_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nemovl_trt.server.commands import serve

    runner = CliRunner()
    (tmp_path / "repo").mkdir()
    cases = [
        (["--triton-url", "127.0.0.1:1", "--replicas", "2"], "--replicas starts tritonservers, so it needs --repo"),
        (["--repo", str(tmp_path / "repo"), "--triton-url", "127.0.0.1:1"], "Give exactly one of"),
        (["--triton-url", "127.0.0.1:1", "--triton-url", "grpc://127.0.0.1:1"], "'127.0.0.1:1' is given twice"),
        (["--triton-url", "localhost"], "'localhost' is not HOST:PORT"),
        (["--triton-url", "127.0.0.1:1", "--health-interval", "0"], "--health-interval"),
    ]
    for args, message in cases:
        res = runner.invoke(serve, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output, (args, res.output)


def test_serve_refuses_more_replicas_than_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from nemovl_trt.server.commands import serve

    (tmp_path / "repo").mkdir()
    engines = _engines(tmp_path / "engines", gpu=True, parallel={"world_size": 2})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    res = CliRunner().invoke(serve, ["--repo", str(tmp_path / "repo"), "--engines-dir", str(engines),
                                     "--replicas", "2", "--log-dir", str(tmp_path / "logs")])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: --replicas 2 needs 2 x 2 GPU(s) (world size 2 from the engines' manifest) but 3 are "
                      "visible (0,1,2); use --replicas 1 or more GPUs."], res.output
    assert "Traceback" not in res.output
