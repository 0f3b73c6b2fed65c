"""Ask benchmark questions through any OpenAI-compatible endpoint (ours, a NIM, ...) and score them.

Plain HTTP (httpx), so it needs nothing beyond the base install: ``POST {base}/chat/completions`` with
the question's media as an ``image_url`` / ``video_url`` content part (data URL unless the dataset
gives a URL), greedy decoding (``temperature`` 0), ``Authorization: Bearer KEY`` when a key is given, and
any extension fields (``mm_processor_kwargs``, ``media_io_kwargs``, ``video_pruning_rate``, ...) only when
the caller passes them. ``<think>…</think>`` blocks are dropped from answers before scoring.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nemovl_trt.evaluation import metrics
from nemovl_trt.evaluation.formats import CHOICE_FORMATS, METRICS, Item

DEFAULT_SYSTEM = "/no_think"  # the model's switch for direct answers (its chat template)
DEFAULT_MAX_TOKENS = 32
RETRY_STATUSES = frozenset({429, 502, 503})
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class EndpointError(RuntimeError):
    """The endpoint cannot be used at all (unreachable, or refused the model listing); one line."""


def api_base(server: str) -> str:
    """``http://h:p`` → ``http://h:p/v1`` (a URL already ending in /v1 is kept)."""
    server = server.rstrip("/")
    if not server.startswith(("http://", "https://")):
        server = "http://" + server
    return server if server.endswith("/v1") else server + "/v1"


def clean_answer(text: str) -> str:
    """The answer text without reasoning blocks, stripped."""
    return _THINK.sub("", text or "").strip()


def score_item(item: Item, prediction: str) -> float:
    """The item's benchmark metric for one prediction, in [0, 1]."""
    metric = METRICS[item.fmt]
    if metric == "anls":
        return metrics.anls(prediction, item.answers)
    if metric == "relaxed_accuracy":
        return metrics.relaxed_accuracy(prediction, item.answers)
    return metrics.exact_choice(prediction, item.answers[0], item.options)


@dataclass(frozen=True)
class Prediction:
    """One asked question: the raw answer, its score, and the error text when the request failed."""

    id: str
    group: str | None
    question: str
    answers: tuple[str, ...]
    prediction: str
    score: float
    seconds: float
    error: str | None = None


@dataclass
class BenchResult:
    """Score of one dataset: the mean metric (fraction), its 95 % interval, per-group scores, errors."""

    fmt: str
    metric: str
    model: str
    endpoint: str
    score: float
    ci95: tuple[float, float]
    n: int
    errors: int
    groups: dict[str, dict[str, float]]
    wall_s: float
    predictions: list[Prediction] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Everything but the predictions (scores as fractions in [0, 1])."""
        return {"format": self.fmt, "metric": self.metric, "model": self.model, "endpoint": self.endpoint,
                "n": self.n, "score": self.score, "ci95": list(self.ci95), "errors": self.errors,
                "groups": self.groups, "wall_s": round(self.wall_s, 3)}

    def table(self) -> str:
        """A plain-text summary: overall, then one line per group."""
        lo, hi = self.ci95
        lines = [f"{self.fmt} ({self.metric}) via {self.endpoint}, model {self.model}",
                 f"{'':<12} {'n':>6} {'score':>8}",
                 f"{'overall':<12} {self.n:>6} {self.score * 100:>7.2f}  (95% CI {lo * 100:.1f}–{hi * 100:.1f})"]
        for name, g in self.groups.items():
            lines.append(f"{name:<12} {int(g['n']):>6} {g['score'] * 100:>7.2f}")
        if self.errors:
            first = next(p.error for p in self.predictions if p.error)
            lines.append(f"{self.errors} request(s) failed and scored 0; first: {first}")
        lines.append(f"{self.wall_s:.1f} s")
        return "\n".join(lines)

    def write_predictions(self, path: Path) -> None:
        """One JSON object per question (JSON Lines)."""
        with Path(path).open("w", encoding="utf-8") as fh:
            for p in self.predictions:
                fh.write(json.dumps(asdict(p)) + "\n")


def summarize(fmt: str, predictions: list[Prediction], model: str, endpoint: str, wall_s: float) -> BenchResult:
    """Aggregate per-question scores into a `BenchResult` (groups in order of first appearance)."""
    scores = [p.score for p in predictions]
    n = len(scores)
    mean = sum(scores) / n if n else 0.0
    binary = METRICS[fmt] != "anls"
    ci = metrics.wilson_interval(sum(scores), n) if binary else metrics.mean_interval(scores)
    groups: dict[str, list[float]] = {}
    for p in predictions:
        if p.group is not None:
            groups.setdefault(str(p.group), []).append(p.score)
    return BenchResult(fmt=fmt, metric=METRICS[fmt], model=model, endpoint=endpoint, score=mean, ci95=ci, n=n,
                       errors=sum(p.error is not None for p in predictions),
                       groups={g: {"n": len(v), "score": sum(v) / len(v)} for g, v in groups.items()},
                       wall_s=wall_s, predictions=predictions)


def _error_text(resp: Any) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") if isinstance(err, dict) else None
    except ValueError:
        msg = None
    return f"HTTP {resp.status_code}: {msg or resp.text[:200]}"


def request_body(item: Item, model: str, prompt_style: str = "benchmark", system: str | None = DEFAULT_SYSTEM,
                 max_tokens: int = DEFAULT_MAX_TOKENS, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chat-completions request for one item."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": [item.media.content_part(),
                                                 {"type": "text", "text": item.prompt(prompt_style)}]})
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    body.update(extra_body or {})
    return body


def evaluate_items(items: list[Item], server: str, *, model: str | None = None, api_key: str | None = None,
                   concurrency: int = 8, max_tokens: int = DEFAULT_MAX_TOKENS, prompt_style: str = "benchmark",
                   system: str | None = DEFAULT_SYSTEM, extra_body: dict[str, Any] | None = None,
                   timeout_s: float = 300.0, retries: int = 2, progress: bool | None = None) -> BenchResult:
    """Ask every item (`concurrency` in flight) and score the answers.

    A request that fails (HTTP error, timeout) is recorded with its error and scores 0; retried first
    (up to `retries` times) on 429/502/503, honouring ``Retry-After`` (at most 10 s). `progress`: a tqdm
    bar on stderr (default: when stderr is a terminal). Raises `EndpointError` when the endpoint cannot
    be reached or lists no model.
    """
    import httpx
    from tqdm import tqdm

    if not items:
        raise ValueError("no items to evaluate")
    fmts = {it.fmt for it in items}
    if len(fmts) != 1:
        raise ValueError(f"items of several formats: {sorted(fmts)}")
    base = api_base(server)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency))
    client = httpx.Client(base_url=base, headers=headers, timeout=timeout_s, limits=limits)
    try:
        if model is None:
            try:
                resp = client.get("/models", timeout=min(timeout_s, 30.0))
            except httpx.HTTPError as e:
                raise EndpointError(f"cannot reach {base} ({type(e).__name__}); is the server running?") from None
            if resp.status_code != 200:
                raise EndpointError(f"{base}/models answered {_error_text(resp)}")
            data = resp.json().get("data") or []
            if not data:
                raise EndpointError(f"{base}/models lists no model; pass --model")
            model = str(data[0]["id"])
        bar = tqdm(total=len(items), unit="q", file=sys.stderr, desc=next(iter(fmts)),
                   disable=not (sys.stderr.isatty() if progress is None else progress))
        lock = threading.Lock()

        def ask(item: Item) -> Prediction:
            t0 = time.perf_counter()
            text, error = "", None
            try:
                body = request_body(item, model, prompt_style, system, max_tokens, extra_body)
            except OSError as e:
                error = f"cannot read the media: {e}"
            else:
                for attempt in range(retries + 1):
                    try:
                        resp = client.post("/chat/completions", json=body)
                    except httpx.HTTPError as e:
                        error = f"{type(e).__name__}: {str(e)[:200]}"
                        break
                    if resp.status_code == 200:
                        choices = resp.json().get("choices") or [{}]
                        text = clean_answer((choices[0].get("message") or {}).get("content") or "")
                        error = None
                        break
                    error = _error_text(resp)
                    if resp.status_code not in RETRY_STATUSES or attempt == retries:
                        break
                    try:
                        wait = float(resp.headers.get("retry-after", "1"))
                    except ValueError:
                        wait = 1.0
                    time.sleep(min(max(wait, 0.1), 10.0))
            score = 0.0 if error else score_item(item, text)
            with lock:
                bar.update(1)
            return Prediction(item.id, item.group, item.question, item.answers, text, score,
                              time.perf_counter() - t0, error)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            predictions = list(pool.map(ask, items))
        bar.close()
        return summarize(items[0].fmt, predictions, model, base, time.perf_counter() - t0)
    finally:
        client.close()


__all__ = ["BenchResult", "CHOICE_FORMATS", "EndpointError", "Prediction", "evaluate_items", "score_item"]
