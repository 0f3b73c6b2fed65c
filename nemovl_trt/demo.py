"""`make demo`: the whole stack on this machine with the trained tiny checkpoint.

    python -m nemovl_trt.demo --workdir .cache/demo

1. builds the cpu target from `data/tiny-trained` into WORKDIR/engines (`nemovl-build engines`;
   up-to-date steps are skipped on a second run),
2. generates the Triton model repository WORKDIR/triton_repo (`nemovl-build repo`),
3. starts tritonserver on it and the OpenAI frontend on a free loopback port (`nemovl serve`'s parts),
4. asks questions about generated images and a video with the `openai` SDK, streamed, and prints
   each answer with its time to first token and total time,
5. shuts everything down. Exit status 1 (one sentence on stderr) when any step fails.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemovl_trt.training.evaluate import data_url, request_extras
from nemovl_trt.training.tasks import Sample, generate_sample

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINED_CHECKPOINT = REPO_ROOT / "data" / "tiny-trained"
DEMO_SEED = 2026  # the demo's questions (held-out split "eval")
DEMO_QUESTIONS: tuple[tuple[str, int], ...] = (
    ("color", 0), ("shape", 0), ("count", 0), ("read", 0), ("detail", 0), ("video_first", 0), ("video_last", 0),
)
READY_TIMEOUT_S = 60.0


class DemoError(RuntimeError):
    """A demo step failed; the message is one sentence for the user."""


@dataclass
class Answer:
    """One streamed answer with its timings (seconds)."""

    sample: Sample
    text: str
    ttft_s: float
    total_s: float

    @property
    def correct(self) -> bool:
        from nemovl_trt.training.tasks import normalize_answer

        return normalize_answer(self.text) == self.sample.answer


def _say(msg: str) -> None:
    print(msg, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(checkpoint: Path, workdir: Path, log: Callable[[str], None] = _say) -> tuple[Path, Path]:
    """Engines (cpu target) and the Triton repository under `workdir`. Returns (engines, repo)."""
    from nemovl_trt.build.engines import build_engines
    from nemovl_trt.build.targets import load_target
    from nemovl_trt.triton.generator import RepoOptions, generate_repository

    if not (checkpoint / "config.json").is_file():
        raise DemoError(f"the trained checkpoint {checkpoint} is missing; run "
                        f"`nemovl-build train-tiny --out {checkpoint}` first.")
    engines = workdir / "engines"
    repo = workdir / "triton_repo"
    log(f"[1/4] building the cpu target from {checkpoint} into {engines} ...")
    t0 = time.perf_counter()
    report = build_engines(checkpoint, load_target("cpu"), engines, log=lambda s: None)
    if report.gpu_errors:
        raise DemoError(report.gpu_errors[0])
    log(f"      done in {time.perf_counter() - t0:.1f} s")
    log(f"[2/4] generating the Triton model repository {repo} ...")
    generate_repository(engines, repo, RepoOptions())
    return engines, repo


@contextmanager
def serve(repo: Path, engines: Path, log: Callable[[str], None] = _say,
          allow_media_hosts: tuple[str, ...] = ()) -> Iterator[str]:
    """tritonserver on `repo` + the OpenAI frontend on a free loopback port; yields the API base URL
    (``http://127.0.0.1:PORT/v1``) once both are ready, and stops both on exit. `allow_media_hosts`
    lets the frontend fetch image URLs from those private/loopback hosts."""
    import httpx
    import uvicorn

    from nemovl_trt.server.app import create_app
    from nemovl_trt.server.settings import Settings
    from nemovl_trt.triton.launcher import TritonLaunchError, TritonServer

    log("[3/4] starting tritonserver and the OpenAI frontend ...")
    t0 = time.perf_counter()
    try:
        triton_cm = TritonServer(repo, engines_dir=engines)
        ts = triton_cm.__enter__()
    except TritonLaunchError as e:
        raise DemoError(str(e).splitlines()[0]) from None
    try:
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(Settings(triton_urls=[ts.grpc_url], allow_media_hosts=list(allow_media_hosts))), host="127.0.0.1",
                                               port=port, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, name="nemovl-demo-api", daemon=True)
        thread.start()
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(root + "/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise DemoError(f"the OpenAI frontend was not ready within {READY_TIMEOUT_S:.0f} s.")
            time.sleep(0.1)
        log(f"      tritonserver (gRPC {ts.grpc_url}) and the API ({root}/v1) ready in "
            f"{time.perf_counter() - t0:.1f} s")
        try:
            yield root + "/v1"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    finally:
        log("[4/4] shutting down ...")
        triton_cm.__exit__(None, None, None)


def media_part(sample: Sample) -> dict[str, Any]:
    """The content part of a demo question (data URLs)."""
    if sample.video is not None:
        return {"type": "video_url", "video_url": {"url": data_url(sample.video, "video/mp4")}}
    return {"type": "image_url", "image_url": {"url": data_url(sample.image_png(), "image/png")}}


def ask_streamed(client: Any, model: str, sample: Sample) -> Answer:
    """Ask one question with `stream=True`; time to first content token and total time."""
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    stream = client.chat.completions.create(model=model, messages=sample.messages(media_part(sample)),
                                            max_tokens=8, temperature=0.0, stream=True,
                                            extra_body=request_extras(sample) or None)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - t0
    return Answer(sample=sample, text="".join(parts), ttft_s=ttft if ttft is not None else total, total_s=total)


def describe(sample: Sample) -> str:
    """A short description of the question's media for the printout."""
    if sample.video is not None:
        return f"video, {len(sample.meta['frames'])} frames at {sample.meta['fps']} fps"
    h, w = sample.image.shape[:2]
    return f"image {w}x{h}"


def run_questions(base_url: str, log: Callable[[str], None] = _say) -> list[Answer]:
    """Ask the demo questions; prints one block per question."""
    try:
        import openai
    except ImportError:
        raise SystemExit("the demo needs openai: pip install 'nemovl-trt[client]'") from None

    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=120.0, max_retries=0)
    model = client.models.list().data[0].id
    log(f"      model '{model}'; asking {len(DEMO_QUESTIONS)} questions (streamed):")
    answers = []
    for qtype, index in DEMO_QUESTIONS:
        sample = generate_sample(qtype, index, seed=DEMO_SEED, split="eval")
        a = ask_streamed(client, model, sample)
        answers.append(a)
        mark = "ok" if a.correct else f"expected '{sample.answer}'"
        log(f"  Q [{qtype}, {describe(sample)}] {sample.question}")
        log(f"  A {a.text.strip()!r:<12} ({mark})  TTFT {a.ttft_s * 1000:.0f} ms, total {a.total_s * 1000:.0f} ms")
    return answers


def main(argv: list[str] | None = None) -> int:
    """The demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m nemovl_trt.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".cache" / "demo",
                        help="Where the engines and the Triton repository are built.")
    parser.add_argument("--checkpoint", type=Path, default=TRAINED_CHECKPOINT, help="Checkpoint to serve.")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        engines, repo = build(args.checkpoint, args.workdir)
        with serve(repo, engines) as base_url:
            answers = run_questions(base_url)
    except KeyboardInterrupt:
        print("demo interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one sentence for the user, no traceback
        print(f"demo failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    right = sum(a.correct for a in answers)
    _say(f"{right}/{len(answers)} answers correct; demo finished in {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
