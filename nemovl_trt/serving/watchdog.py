"""A tiny cleanup process that outlives `nemovl serve` by a moment when it is killed (standard library only,
plus triton/launcher.py's process helpers, which are standard library only too).

`nemovl serve` starts it (`Watchdog.start()`) with a pipe as its standard input and announces, one line at a
time, what it would have to clean up: `group PGID` (a tritonserver process group), `shm PATH` (a Python-backend
shared-memory region), `forget PGID`. A clean exit writes `done`. When the pipe reaches end-of-file without
`done` (the parent died, even by SIGKILL: the kernel closes its end), the watchdog SIGKILLs every process of
the announced groups that is a tritonserver or a Python-backend stub (checked by command line, so a reused
group id of someone else is never touched), waits for them to go, and unlinks the announced regions.

tritonserver itself already gets SIGKILL from the kernel (PR_SET_PDEATHSIG, triton/launcher.py) and the stubs
exit once their parent is gone; the watchdog is the second line: it also removes the shared memory, which
nobody else does after a SIGKILL.

Run: `python -I -m nemovl_trt.serving.watchdog` (reads standard input).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nemovl_trt.triton.launcher import group_pids

OUR_BINARIES = (b"tritonserver", b"triton_python_backend_stub")
SHM_DIR = Path("/dev/shm")


def _members(pgid: int) -> list[int]:
    """Live tritonserver / stub processes of group `pgid` (a reused group id of someone else is skipped)."""
    out = []
    for pid in group_pids(pgid):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0.endswith(OUR_BINARIES):
            out.append(pid)
    return out


def cleanup(groups: set[int], regions: set[Path], wait_s: float = 10.0) -> tuple[int, int]:
    """Kill our processes in `groups`, unlink `regions`; returns (processes killed, regions removed)."""
    killed = 0
    for pgid in groups:
        for pid in _members(pgid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_members(g) for g in groups):
        time.sleep(0.05)
    removed = 0
    for region in regions:
        if region.parent != SHM_DIR:
            continue  # only ever under /dev/shm
        try:
            region.unlink()
            removed += 1
        except (FileNotFoundError, PermissionError):
            pass
    return killed, removed


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for nemovl serve, not for us
    groups: set[int] = set()
    regions: set[Path] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", "replace").strip()
        cmd, _, arg = line.partition(" ")
        if cmd == "done":
            return 0
        if cmd == "group" and arg.isdigit():
            groups.add(int(arg))
        elif cmd == "forget" and arg.isdigit():
            groups.discard(int(arg))
        elif cmd == "shm" and arg:
            regions.add(Path(arg))
        elif cmd == "unshm" and arg:
            regions.discard(Path(arg))
    killed, removed = cleanup(groups, regions)
    sys.stderr.write(f"[nemovl watchdog] nemovl serve is gone: killed {killed} leftover process(es), removed "
                     f"{removed} shared-memory region(s).\n")
    return 0


class Watchdog:
    """The parent's side: start the process, announce groups and regions, say `done` on a clean exit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._regions: set[Path] = set()

    def start(self) -> Watchdog:
        self.proc = subprocess.Popen([sys.executable, "-I", "-m", "nemovl_trt.serving.watchdog"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _say(self, line: str) -> None:
        with self._lock:
            if self.proc is None or self.proc.stdin is None or self.proc.stdin.closed:
                return
            try:
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def watch_group(self, pgid: int) -> None:
        if pgid not in self._groups:
            self._groups.add(pgid)
            self._say(f"group {pgid}")

    def forget_group(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._say(f"forget {pgid}")

    def watch_shm(self, regions: set[Path] | list[Path]) -> None:
        for r in regions:
            if r not in self._regions:
                self._regions.add(r)
                self._say(f"shm {r}")

    def forget_shm(self, regions: set[Path] | list[Path]) -> None:
        for r in regions:
            if r in self._regions:
                self._regions.discard(r)
                self._say(f"unshm {r}")

    def close(self) -> None:
        """Clean exit: everything was stopped by its owner; the watchdog ends without touching anything."""
        if self.proc is None:
            return
        self._say("done")
        with self._lock:
            if self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


if __name__ == "__main__":
    raise SystemExit(main())
