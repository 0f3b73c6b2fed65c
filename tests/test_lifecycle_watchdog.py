"""The two lines of defence that keep tritonserver from outliving `nemovl serve`, without tritonserver:
PR_SET_PDEATHSIG through the exec wrapper (triton/launcher.py) and the watchdog process
(serving/watchdog.py); plus DrainingServer not re-raising the signal (the old SIGTERM leak)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from nemovl_trt.serving.watchdog import Watchdog
from nemovl_trt.triton.launcher import pdeathsig_command, pid_alive


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def test_pdeathsig_wrapper_execs_in_place_and_dies_with_its_parent(tmp_path: Path) -> None:
    # a parent that starts `sleep` through the wrapper, prints the child's pid and blocks
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from nemovl_trt.triton.launcher import pdeathsig_command
        p = subprocess.Popen(pdeathsig_command(["/bin/sleep", "120"]), start_new_session=True)
        print(p.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"/bin/sleep":
            assert time.monotonic() < deadline, "the wrapper did not exec"
            time.sleep(0.02)
        assert os.getpgid(child) == child  # own process group, as tritonserver
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(child, 10), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_pdeathsig_wrapper_refuses_to_start_for_a_dead_parent() -> None:
    cmd = pdeathsig_command(["/bin/true"], parent_pid=1 if os.getppid() != 1 else 2)
    assert subprocess.run(cmd).returncode == 70


def _fake_server(tmp_path: Path) -> subprocess.Popen:
    """A process named like tritonserver in its own group (a renamed `sleep`)."""
    exe = tmp_path / "tritonserver"
    exe.symlink_to("/bin/sleep")
    return subprocess.Popen([str(exe), "120"], start_new_session=True)


def test_watchdog_cleans_up_when_its_parent_dies(tmp_path: Path) -> None:
    srv = _fake_server(tmp_path)
    region = Path("/dev/shm") / f"triton_python_backend_shm_region_test-{uuid.uuid4()}"
    region.write_bytes(b"x")
    bystander = subprocess.Popen(["/bin/sleep", "120"], start_new_session=True)  # not ours: left alone
    dog = Watchdog().start()
    try:
        dog.watch_group(srv.pid)
        dog.watch_group(bystander.pid)
        dog.watch_shm([region])
        assert dog.proc is not None
        dog.proc.stdin.close()  # what the kernel does when nemovl serve dies
        assert dog.proc.wait(20) == 0
        assert srv.wait(10) == -signal.SIGKILL
        assert not region.exists()
        assert bystander.poll() is None
    finally:
        for p in (srv, bystander):
            p.kill()
            p.wait()
        region.unlink(missing_ok=True)


def test_watchdog_done_leaves_everything(tmp_path: Path) -> None:
    srv = _fake_server(tmp_path)
    region = Path("/dev/shm") / f"triton_python_backend_shm_region_test-{uuid.uuid4()}"
    region.write_bytes(b"x")
    dog = Watchdog().start()
    try:
        dog.watch_group(srv.pid)
        dog.watch_shm([region])
        proc = dog.proc
        dog.close()
        assert proc.returncode == 0 and srv.poll() is None and region.exists()
    finally:
        srv.kill()
        srv.wait()
        region.unlink(missing_ok=True)


def test_draining_server_returns_instead_of_re_raising_sigterm(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os, signal, threading, time, uvicorn
        from nemovl_trt.serving.lifecycle import DrainingServer

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    m = await receive()
                    await send({"type": m["type"] + ".complete"})
                    if m["type"] == "lifespan.shutdown":
                        return
        seen = []
        server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"),
                                on_signal=seen.append)
        threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        server.run()
        print("after run", seen, flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"after run [{int(signal.SIGTERM)}]" in r.stdout
