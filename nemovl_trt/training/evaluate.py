"""Accuracy of a served model on held-out synthetic questions, through the OpenAI API.

Images go as base64 PNG data URLs (or, with ``urls=True``, as ``http://127.0.0.1:PORT/…`` URLs served by
a loopback HTTP server this module starts — the API server must be started to allow loopback
fetches); videos always go as ``data:video/mp4;base64,…`` URLs. Answers are greedy (temperature 0)
and compared to the generator's answer after `normalize_answer`.
"""

from __future__ import annotations

import base64
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from nemovl_trt.training.tasks import (
    QUESTION_TYPES,
    TRAINED_VIDEO_PRUNING_RATE,
    Sample,
    generate_samples,
    normalize_answer,
)

DEFAULT_EVAL_SEED = 1  # training's default seed is 0; the splits differ anyway
MAX_ANSWER_TOKENS = 8


@dataclass(frozen=True)
class Record:
    """One asked question: type, expected answer, the model's raw text, and whether it matched."""

    qtype: str
    index: int
    answer: str
    prediction: str
    correct: bool
    seconds: float


@dataclass
class EvalResult:
    """Per-type and overall accuracy (fractions in [0, 1]) plus every record."""

    per_type: dict[str, float]
    overall: float
    counts: dict[str, int]
    records: list[Record] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """``{"per_type": {type: accuracy}, "overall": accuracy}``."""
        return {"per_type": dict(self.per_type), "overall": self.overall}

    def table(self) -> str:
        """A plain-text table: type, questions, correct, accuracy."""
        lines = [f"{'type':<12} {'n':>4} {'correct':>8} {'accuracy':>9}"]
        for t, acc in self.per_type.items():
            n = self.counts[t]
            lines.append(f"{t:<12} {n:>4} {round(acc * n):>8} {acc:>9.1%}")
        total = sum(self.counts.values())
        lines.append(f"{'overall':<12} {total:>4} {sum(r.correct for r in self.records):>8} {self.overall:>9.1%}")
        return "\n".join(lines)


def summarize(records: list[Record]) -> EvalResult:
    """Aggregate records into per-type accuracy (types in `QUESTION_TYPES` order) and overall accuracy."""
    per_type: dict[str, float] = {}
    counts: dict[str, int] = {}
    for t in QUESTION_TYPES:
        rs = [r for r in records if r.qtype == t]
        if rs:
            counts[t] = len(rs)
            per_type[t] = sum(r.correct for r in rs) / len(rs)
    overall = sum(r.correct for r in records) / len(records) if records else 0.0
    return EvalResult(per_type=per_type, overall=overall, counts=counts, records=records)


def data_url(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,<data>``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes, str]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        entry = self.files.get(self.path)
        if entry is None:
            self.send_error(404)
            return
        body, mime = entry
        self.send_response(200)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return


@contextmanager
def loopback_media_server(files: dict[str, tuple[bytes, str]]) -> Iterator[str]:
    """Serve ``{path: (bytes, mime)}`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = type("MediaHandler", (_MediaHandler,), {"files": dict(files)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="nemovl-eval-media", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def media_part(sample: Sample, url_base: str | None = None) -> dict[str, Any]:
    """The OpenAI content part carrying the sample's media: an image (data URL, or
    ``{url_base}/{type}-{index}.png`` when `url_base` is given) or a video data URL."""
    if sample.video is not None:
        return {"type": "video_url", "video_url": {"url": data_url(sample.video, "video/mp4")}}
    if url_base is not None:
        return {"type": "image_url", "image_url": {"url": f"{url_base}/{sample.qtype}-{sample.index}.png"}}
    return {"type": "image_url", "image_url": {"url": data_url(sample.image_png(), "image/png")}}


def api_base(server: str) -> str:
    """The OpenAI base URL for a server address: ``http://h:p`` → ``http://h:p/v1``."""
    server = server.rstrip("/")
    if not server.startswith(("http://", "https://")):
        server = "http://" + server
    return server if server.endswith("/v1") else server + "/v1"


def request_extras(sample: Sample, max_num_tiles: int | None = None,
                   video_pruning_rate: float | None = TRAINED_VIDEO_PRUNING_RATE) -> dict[str, Any]:
    """The NIM extension fields for a question: ``mm_processor_kwargs.max_num_tiles`` (images) and
    ``video_pruning_rate`` (videos), each only when given."""
    extra: dict[str, Any] = {}
    if sample.video is None and max_num_tiles is not None:
        extra["mm_processor_kwargs"] = {"max_num_tiles": max_num_tiles}
    if sample.video is not None and video_pruning_rate is not None:
        extra["video_pruning_rate"] = video_pruning_rate
    return extra


def ask(client: Any, model: str, sample: Sample, part: dict[str, Any], max_num_tiles: int | None = None,
        video_pruning_rate: float | None = TRAINED_VIDEO_PRUNING_RATE, max_tokens: int = MAX_ANSWER_TOKENS) -> str:
    """Ask one question (greedy, non-streamed) and return the answer text."""
    extra = request_extras(sample, max_num_tiles, video_pruning_rate)
    resp = client.chat.completions.create(model=model, messages=sample.messages(part), max_tokens=max_tokens,
                                          temperature=0.0, extra_body=extra or None)
    return resp.choices[0].message.content or ""


def evaluate(server: str, n: int, seed: int = DEFAULT_EVAL_SEED, urls: bool = False,
             max_num_tiles: int | None = None, video_pruning_rate: float | None = None, concurrency: int = 4, model: str | None = None,
             api_key: str = "none", timeout_s: float = 120.0, types: tuple[str, ...] = QUESTION_TYPES,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Generate `n` held-out questions (split "eval", `seed`) and ask them through the OpenAI API.

    Args:
        server: the frontend address, e.g. ``http://127.0.0.1:8000`` (``/v1`` is appended if missing).
        n: questions in total, round-robin over `types`.
        seed: the eval stream's seed.
        urls: send images as loopback http URLs instead of data URLs.
        max_num_tiles: sent as ``mm_processor_kwargs.max_num_tiles`` for images when given.
        video_pruning_rate: sent with videos; None means the rate the tiny checkpoint was trained with.
        concurrency: requests in flight at once.
        model: the model id; by default the first id of ``/v1/models``.
        progress: called with (done, total) after each answer.

    Returns:
        An `EvalResult`. Raises `openai.APIError` subclasses when the server fails.
    """
    try:
        import openai
    except ImportError as e:  # optional extra
        raise ModuleNotFoundError("evaluate() needs openai: pip install 'nemovl-trt[client]'") from e

    client = openai.OpenAI(base_url=api_base(server), api_key=api_key, timeout=timeout_s, max_retries=0)
    if model is None:
        model = client.models.list().data[0].id
    samples = generate_samples(n, seed=seed, split="eval", types=types)
    q = TRAINED_VIDEO_PRUNING_RATE if video_pruning_rate is None else video_pruning_rate
    files = {f"/{s.qtype}-{s.index}.png": (s.image_png(), "image/png") for s in samples
             if urls and s.image is not None}
    done = 0
    lock = threading.Lock()

    def run_one(sample: Sample, url_base: str | None) -> Record:
        nonlocal done
        t0 = time.perf_counter()
        text = ask(client, model, sample, media_part(sample, url_base), max_num_tiles, q)
        rec = Record(sample.qtype, sample.index, sample.answer, text,
                     normalize_answer(text) == sample.answer, time.perf_counter() - t0)
        with lock:
            done += 1
            if progress is not None:
                progress(done, len(samples))
        return rec

    def run_all(url_base: str | None) -> list[Record]:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(lambda s: run_one(s, url_base), samples))

    if files:
        with loopback_media_server(files) as base:
            records = run_all(base)
    else:
        records = run_all(None)
    return summarize(records)
