"""Lifecycle of `nemovl serve --repo` (127.0.0.1 only, bounded): SIGTERM drains in-flight requests for the
grace period and then stops tritonserver and every stub, leaving no process and no shared-memory region;
SIGKILL of `nemovl serve` itself does not leave tritonserver, a stub or a region behind (PR_SET_PDEATHSIG
on tritonserver + the watchdog process); logs go to --log-dir and nothing is written in the working directory
or the checkout."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.faults_support import ServeProcess, Stream, chat_body, own_repository, processes_of, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _watchdogs() -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"nemovl_trt.serving.watchdog" in (entry / "cmdline").read_bytes():
                    out.add(int(entry.name))
            except OSError:
                continue
    return out


def test_sigterm_drains_then_stops_everything(cpu_engines_dir: Path, tmp_path: Path) -> None:
    triton_repo_dir = own_repository(cpu_engines_dir, tmp_path / "repo")
    before_checkout = set((ROOT / ".cache").glob("**/tritonserver-*.log")) if (ROOT / ".cache").exists() else set()
    sp = ServeProcess(triton_repo_dir, tmp_path / "cwd", ["--shutdown-grace", "4"]).start()
    try:
        ts = sp.triton_pid()
        stubs = sp.stubs()
        regions = sp.shm_regions()
        assert ts and len(stubs) == 4 and len(regions) == 4 and all(r.exists() for r in regions)
        short = Stream(sp.url, chat_body("Say hi.", max_tokens=150, ignore_eos=True))
        long = Stream(sp.url, chat_body("Tell a long story.", max_tokens=8000, ignore_eos=True))
        assert short.started.wait(60) and long.started.wait(60)
        t0 = time.monotonic()
        sp.signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):  # no new connections while draining
            httpx.get(sp.url + "/v1/health/live", timeout=3)
        assert short.join(30) and long.join(30)
        code = sp.wait(60)
        stop_s = time.monotonic() - t0
    finally:
        sp.kill()
    # the short request finished normally inside the grace period; the long one got a clean error event
    assert short.done and short.error_event() is None and short.finish_reason() == "length"
    err = long.error_event()
    assert long.done and err is not None and err["code"] == "model_not_ready" and "shutting down" in err["message"]
    assert code == 0 and stop_s < 40
    assert processes_of(triton_repo_dir) == []
    assert [r for r in regions if r.exists()] == []
    out = sp.output()
    assert "draining in-flight requests" in out and "stopping tritonserver" in out
    logs = list(sp.log_dir.glob("tritonserver-*.log"))
    assert len(logs) == 1 and "Started GRPCInferenceService" in logs[0].read_text()
    assert sorted(p.name for p in sp.workdir.iterdir()) == ["logs"]  # nothing else written in the cwd
    after_checkout = set((ROOT / ".cache").glob("**/tritonserver-*.log")) if (ROOT / ".cache").exists() else set()
    assert after_checkout == before_checkout


def test_sigkill_of_nemovl_serve_leaves_nothing(cpu_engines_dir: Path, tmp_path: Path) -> None:
    triton_repo_dir = own_repository(cpu_engines_dir, tmp_path / "repo")
    dogs_before = _watchdogs()
    sp = ServeProcess(triton_repo_dir, tmp_path / "cwd").start()
    try:
        ts = sp.triton_pid()
        regions = sp.shm_regions()
        stubs = sp.stubs()
        assert ts and len(stubs) == 4 and len(regions) == 4
        mine = _watchdogs() - dogs_before
        assert len(mine) == 1
        stream = Stream(sp.url, chat_body("Tell a long story.", max_tokens=8000, ignore_eos=True))
        assert stream.started.wait(60)
        sp.signal(signal.SIGKILL)
        assert sp.wait(10) == -signal.SIGKILL
        assert stream.join(30)  # the client sees the connection drop, no hang
        assert wait_until(lambda: processes_of(triton_repo_dir) == [], 30), processes_of(triton_repo_dir)
        assert wait_until(lambda: not any(r.exists() for r in regions), 30)
        assert wait_until(lambda: not (mine & _watchdogs()), 30)  # the watchdog did its job and left
    finally:
        sp.kill()
