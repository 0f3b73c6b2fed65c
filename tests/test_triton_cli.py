"""`nemovl serve-triton`: starts a real tritonserver, serves, and on SIGTERM stops it leaving no process and
no Python-backend shared-memory region behind. Also the launcher's error for a missing repository."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nemovl_trt.triton.launcher import (
    TritonLaunchError,
    TritonServer,
    free_port,
    group_pids,
    shm_regions_mapped_by,
)
from tests.fixtures_triton import stream_nemovl

pytestmark = pytest.mark.integration


def _server_pid(http_port: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"tritonserver") and f"--http-port={http_port}".encode() in cmd:
            return int(entry.name)
    return None


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_serve_triton_stops_cleanly_on_sigterm(triton_repo_dir: Path, cpu_engines_dir: Path, tmp_path: Path) -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    exe = Path(sys.executable).parent / "nemovl"
    proc = subprocess.Popen([str(exe), "serve-triton", "--repo", str(triton_repo_dir), "--engines",
                             str(cpu_engines_dir), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--log-file", str(tmp_path / "server.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _ready(http):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "serve-triton did not become ready"
            time.sleep(0.2)
        res = stream_nemovl(f"127.0.0.1:{grpc}", [{"role": "user", "content": "hello"}], {"max_tokens": 3})
        assert res.error is None and res.completion_tokens >= 1
        server_pid = _server_pid(http)
        assert server_pid is not None
        pids = group_pids(server_pid)
        assert len(pids) >= 5  # tritonserver + one stub per model
        regions = shm_regions_mapped_by(pids)
        assert regions and all(r.exists() for r in regions)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "[tritonserver]" in text  # the server log is forwarded with a prefix
    assert "stopping tritonserver" in text
    assert group_pids(server_pid) == []
    assert [r for r in regions if r.exists()] == []
    assert not _ready(http)
    sys.stderr.write(f"\n[serve-triton] stopped in {stop_s:.1f} s\n")


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TritonLaunchError, match="does not exist"):
        TritonServer(tmp_path / "nope")


def test_nvdec_video_decoder_without_a_gpu_fails_the_preprocessor_load_in_one_line(cpu_engines_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """`nemovl-build repo --video-decoder nvdec` on a machine without a GPU: the preprocessor refuses to load
    with the decoder's one-line reason (not a failure on the first video request)."""
    from click.testing import CliRunner

    from nemovl_trt.cli import build_cli

    repo = tmp_path / "repo"
    result = CliRunner().invoke(build_cli, ["repo", "--engines", str(cpu_engines_dir), "--out", str(repo),
                                            "--video-decoder", "nvdec"])
    assert result.exit_code == 0, result.output
    cfg = (repo / "preprocessor" / "config.pbtxt").read_text()
    assert 'key: "video_decoder"\n  value {\n    string_value: "nvdec"' in cfg
    bad = CliRunner().invoke(build_cli, ["repo", "--engines", str(cpu_engines_dir), "--out", str(tmp_path / "r2"),
                                         "--video-decoder", "vaapi"])
    assert bad.exit_code == 2 and "'vaapi' is not one of 'cpu', 'nvdec'" in bad.output
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log", ready_timeout_s=180)
    try:
        with pytest.raises(TritonLaunchError) as err:
            server.start()
    finally:
        server.stop()
    assert "video decoder 'nvdec' needs an NVIDIA GPU and torchcodec" in str(err.value)
