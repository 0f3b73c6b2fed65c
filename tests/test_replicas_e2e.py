"""`nemovl serve --replicas 2` on the trained tiny checkpoint (data/tiny-trained), real processes, 127.0.0.1
only, every wait bounded:

1. 40 mixed requests (text, image, video, a multi-turn conversation about an image; half streamed) at
   concurrency 8 all answer correctly, and /metrics shows both replicas took traffic (40 requests in all,
   no failure, no retry);
2. SIGKILL of one replica's tritonserver in the middle of a run of 40 requests (the replica serving a long
   stream that has started): every outcome is counted — a correct answer, or (only for a stream whose generation
   had started) a stream ending with a `model_not_ready` error event after its tokens; a non-streamed request cut
   mid-generation runs again on the survivor and is answered correctly (never a 503); no hung connection; the frontend's failure and retry counters account for every client-visible error;
   while the replica is down no request is routed to it; once its supervisor restarted it, it takes traffic
   again within TRAFFIC_AGAIN_S.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults_support import MODEL, ServeProcess, Stream, processes_of, wait_until

pytestmark = pytest.mark.integration

TRAINED = Path(__file__).resolve().parent.parent / "data" / "tiny-trained"
EVAL_SEED = 4242  # held-out questions (the eval split)
N_REQUESTS = 40
CONCURRENCY = 8
ANSWER_TOKENS = 8
LONG_TOKENS = 8000  # a stream still running when its replica is killed (1500 tokens took < 10 s here)
TRAFFIC_AGAIN_S = 10.0  # issue: "once it is restarted it takes traffic again within 10 s"
RESTART_LIMIT_S = 120.0
IMAGE_TYPES = ("color", "shape", "count", "read")
VIDEO_TYPES = ("video_first", "video_last")
TEXT_PROMPT = "Hello, who are you?"
SERIES = re.compile(r'^(nemovl_replica_\w+|nemovl_triton_up)\{.*replica="([^"]+)".*\} (\S+)$')


@dataclass
class Job:
    """One request of the mixed run: `expected` is the right answer (None: text, checked for agreement)."""

    kind: str
    body: dict[str, Any]
    expected: str | None


@dataclass
class Outcome:
    """What the client saw: `kind` of job, HTTP status, answer text, error code, content events before it."""

    job: Job
    status: int | None
    text: str
    error: str | None
    events_before_error: int = 0
    transport: str | None = None


def mixed_jobs(n: int) -> list[Job]:
    from nemovl_trt.demo import media_part
    from nemovl_trt.training.evaluate import request_extras
    from nemovl_trt.training.tasks import generate_sample

    kinds = [*IMAGE_TYPES, *VIDEO_TYPES, "text", "multi_turn"]
    jobs = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        stream = (i // len(kinds)) % 2 == i % 2  # every kind both streamed and not
        base = {"model": MODEL, "max_tokens": ANSWER_TOKENS, "temperature": 0.0, "stream": stream}
        if kind == "text":
            jobs.append(Job(kind, {**base, "messages": [{"role": "user", "content": TEXT_PROMPT}]}, None))
            continue
        qtype = "shape" if kind == "multi_turn" else kind
        s = generate_sample(qtype, i, seed=EVAL_SEED, split="eval")
        msgs = s.messages(media_part(s))
        if kind == "multi_turn":  # the image in turn 1, the question in turn 2: no replica affinity needed
            msgs[1]["content"][1]["text"] = "Look at this image."
            msgs += [{"role": "assistant", "content": "yes"}, {"role": "user", "content": s.question}]
        jobs.append(Job(kind, {**base, "messages": msgs, **request_extras(s)}, s.answer))
    return jobs


def send(url: str, job: Job, timeout_s: float = 180.0) -> Outcome:
    """Send one job; never raises (a transport failure is an outcome too)."""
    try:
        if not job.body["stream"]:
            r = httpx.post(url + "/v1/chat/completions", json=job.body, timeout=timeout_s)
            if r.status_code != 200:
                return Outcome(job, r.status_code, "", r.json()["error"]["code"])
            return Outcome(job, 200, r.json()["choices"][0]["message"]["content"] or "", None)
        parts: list[str] = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=job.body, timeout=timeout_s) as r:
            if r.status_code != 200:
                return Outcome(job, r.status_code, "", json.loads(r.read())["error"]["code"])
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", events[-3:]
        for n, e in enumerate(events[:-1]):
            ev = json.loads(e)
            if "error" in ev:
                return Outcome(job, 200, "".join(parts), ev["error"]["code"], events_before_error=n)
            parts += [c["delta"].get("content") or "" for c in ev["choices"]]
        return Outcome(job, 200, "".join(parts), None)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return Outcome(job, None, "", None, transport=f"{type(e).__name__}: {e}")


def run_jobs(url: str, jobs: list[Job], concurrency: int = CONCURRENCY,
             on_done: threading.Event | None = None, after: int = 0) -> list[Outcome]:
    """All jobs at `concurrency`; `on_done` is set once `after` of them have finished."""
    done = [0]
    lock = threading.Lock()

    def one(job: Job) -> Outcome:
        out = send(url, job)
        with lock:
            done[0] += 1
            if on_done is not None and done[0] >= after:
                on_done.set()
        return out

    with ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(one, jobs))


def replica_series(sp: ServeProcess) -> dict[str, dict[str, float]]:
    """{series name: {replica gRPC URL: value}} of the per-replica series on /metrics."""
    out: dict[str, dict[str, float]] = {}
    for line in httpx.get(sp.url + "/metrics", timeout=10).text.splitlines():
        m = SERIES.match(line)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return out


def replica_pids(sp: ServeProcess) -> dict[str, int]:
    """{gRPC HOST:PORT: tritonserver pid} of the replicas of `sp`."""
    found = {}
    for pid in processes_of(sp.repo):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if argv[0].endswith("tritonserver") and ppid == str(sp.proc.pid):
            opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
            found[f"{opts['grpc-address']}:{opts['grpc-port']}"] = pid
    return found


def frontend_log(sp: ServeProcess) -> str:
    """The replica / supervisor lines of `nemovl serve`'s output (for failure messages)."""
    return "\n".join(line for line in sp.output().splitlines() if "nemovl.replicas" in line
                     or "nemovl.supervisor" in line or "nemovl.pool" in line)[-4000:]


def is_correct(o: Outcome, text_answer: str) -> bool:
    from nemovl_trt.training.tasks import normalize_answer

    if o.job.expected is None:
        return o.text.strip() == text_answer
    return normalize_answer(o.text) == o.job.expected


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    if not (TRAINED / "config.json").is_file():
        pytest.skip("data/tiny-trained is not committed")
    from nemovl_trt import demo

    work = tmp_path_factory.mktemp("replicas")
    _engines, repo = demo.build(TRAINED, work / "build", log=lambda _: None)
    with ServeProcess(repo, work / "cwd", ["--replicas", "2", "--max-concurrent", "16",
                                           "--log-level", "warning"]).running() as sp:
        yield sp


@pytest.fixture(scope="module")
def text_answer(replicated: ServeProcess) -> str:
    """The greedy answer to TEXT_PROMPT (both replicas serve the same engines, so they must agree)."""
    r = httpx.post(replicated.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": TEXT_PROMPT}], "max_tokens": ANSWER_TOKENS,
        "temperature": 0.0})
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"].strip()
    assert answer
    return answer


def test_two_replicas_answer_mixed_requests_and_share_the_traffic(replicated: ServeProcess,
                                                                   text_answer: str) -> None:
    pids = replica_pids(replicated)
    assert len(pids) == 2 and len(set(pids.values())) == 2, pids
    before = replica_series(replicated)
    assert set(before["nemovl_replica_up"]) == set(pids) and set(before["nemovl_replica_up"].values()) == {1.0}

    outcomes = run_jobs(replicated.url, mixed_jobs(N_REQUESTS))

    bad = [(o.job.kind, o.status, o.error, o.transport, o.text, o.job.expected) for o in outcomes
           if o.status != 200 or o.error or not is_correct(o, text_answer)]
    assert not bad, bad
    after = replica_series(replicated)
    took = {u: after["nemovl_replica_requests_total"][u] - before["nemovl_replica_requests_total"][u] for u in pids}
    assert sum(took.values()) == N_REQUESTS and min(took.values()) >= 1, took
    for name in ("nemovl_replica_failures_total", "nemovl_replica_retries_total"):
        assert after[name] == before[name], (name, before[name], after[name])
    assert set(after["nemovl_replica_in_flight"].values()) == {0.0}
    print(f"\n[replicas] {N_REQUESTS} mixed requests: {Counter(o.job.kind for o in outcomes)}; per replica {took}")


class Sampler:
    """/metrics every `step_s` in a thread: (monotonic time, per-replica series)."""

    def __init__(self, sp: ServeProcess, step_s: float = 0.1) -> None:
        self.sp, self.step_s = sp, step_s
        self.samples: list[tuple[float, dict[str, dict[str, float]]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), replica_series(self.sp)))
            except httpx.HTTPError:
                pass
            self._stop.wait(self.step_s)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=30)


def test_sigkill_of_one_replica_mid_run(replicated: ServeProcess, text_answer: str) -> None:
    sp = replicated
    pids = replica_pids(sp)
    assert len(pids) == 2
    before = replica_series(sp)

    # a long stream; the replica serving it is the one killed
    long_body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                 "max_tokens": LONG_TOKENS, "ignore_eos": True}
    long = Stream(sp.url, long_body, timeout_s=300)
    assert long.started.wait(60) and len(long.events) >= 3, long.error
    busy = replica_series(sp)["nemovl_replica_in_flight"]
    assert sorted(busy.values()) == [0.0, 1.0], busy
    victim = next(u for u, v in busy.items() if v == 1.0)
    survivor = next(u for u in pids if u != victim)

    sampler = Sampler(sp)
    midway = threading.Event()
    results: list[Outcome] = []
    runner = threading.Thread(target=lambda: results.extend(
        run_jobs(sp.url, mixed_jobs(N_REQUESTS), on_done=midway, after=N_REQUESTS // 5)), daemon=True)
    runner.start()
    assert midway.wait(240), "the run did not get going"
    # kill while the victim has requests of the run in flight besides its long stream
    wait_until(lambda: replica_series(sp)["nemovl_replica_in_flight"][victim] >= 3, 30, 0.02)
    os.kill(pids[victim], signal.SIGKILL)
    t_kill = time.monotonic()

    runner.join(300)
    assert not runner.is_alive(), "requests hung after the kill"
    assert long.join(60), "the long stream hung after the kill"
    assert len(results) == N_REQUESTS

    # the long stream had tokens out: it ends with an error event and [DONE] (never retried, never hung)
    assert long.error is None and long.done, (long.error, long.events[-2:])
    assert long.finish_reason() is None, "the long stream finished before the kill; raise LONG_TOKENS"
    assert (long.error_event() or {}).get("code") == "model_not_ready", long.events[-2:]
    assert len(long.events) >= 5  # tokens, then the error event and [DONE]

    # every outcome of the run is accounted for
    ok = [o for o in results if o.status == 200 and o.error is None]
    wrong = [(o.job.kind, o.text, o.job.expected) for o in ok if not is_correct(o, text_answer)]
    assert not wrong, wrong
    cut_streams = [o for o in results if o.status == 200 and o.error is not None]
    cut_plain = [o for o in results if o.status == 503 and not o.job.body["stream"]]
    other = [(o.job.kind, o.status, o.error, o.transport) for o in results
             if o not in ok and o not in cut_streams and o not in cut_plain]
    assert not other, (other, frontend_log(sp))
    assert all(o.error == "model_not_ready" and o.events_before_error >= 1 for o in cut_streams), \
        [(o.error, o.events_before_error) for o in cut_streams]  # an unstarted stream is retried instead
    # a non-streamed request had sent nothing to its client: cut mid-generation, it runs again on the survivor
    assert cut_plain == [], [(o.job.kind, o.error) for o in cut_plain]
    print(f"\n[replicas] frontend log:\n{frontend_log(sp)}")

    # wait for the supervisor's restart, then for the frontend to route to the replica again
    assert wait_until(lambda: replica_series(sp)["nemovl_triton_up"][victim] == 1.0, RESTART_LIMIT_S, 0.05)
    restarted = replica_series(sp)
    routed = restarted["nemovl_replica_requests_total"][victim]
    stop_traffic = threading.Event()

    def traffic() -> None:  # short sequential requests: ties alternate, so an UP victim gets every other one
        body = {"model": MODEL, "messages": [{"role": "user", "content": TEXT_PROMPT}], "max_tokens": 2}
        while not stop_traffic.is_set():
            try:
                httpx.post(sp.url + "/v1/chat/completions", json=body, timeout=60)
            except httpx.HTTPError:
                time.sleep(0.1)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        back = wait_until(lambda: replica_series(sp)["nemovl_replica_requests_total"][victim] > routed,
                          TRAFFIC_AGAIN_S, 0.05)
    finally:
        stop_traffic.set()
        sender.join(90)
        sampler.stop()
    assert back, f"the restarted replica took no traffic within {TRAFFIC_AGAIN_S} s"

    # the counters account for every failure: those not retried are exactly what clients saw
    d = {name: {u: restarted[name][u] - before[name][u] for u in pids} for name in
         ("nemovl_replica_requests_total", "nemovl_replica_failures_total", "nemovl_replica_retries_total")}
    fails, retries = d["nemovl_replica_failures_total"], d["nemovl_replica_retries_total"]
    assert fails[survivor] == 0 and retries[survivor] == 0, d
    client_errors = len(cut_streams) + len(cut_plain) + 1  # + the victim's long stream
    assert fails[victim] - retries[victim] == client_errors, (d, client_errors)
    assert retries[victim] >= 1, d  # requests in the victim's queue at the kill were re-sent and answered
    assert sum(d["nemovl_replica_requests_total"].values()) == N_REQUESTS + 1 + retries[victim], d

    # no request was routed to the victim while it was down
    down = [(t, s) for t, s in sampler.samples if t >= t_kill and s["nemovl_replica_up"][victim] == 0.0]
    assert down, "the frontend never marked the killed replica down"
    first_down = down[0][0]
    up_again = next((t for t, s in sampler.samples if t > first_down and s["nemovl_replica_up"][victim] == 1.0),
                    float("inf"))
    while_down = {s["nemovl_replica_requests_total"][victim] for t, s in sampler.samples if first_down <= t < up_again}
    assert len(while_down) == 1, sorted(while_down)
    print(f"\n[replicas] kill -9 of {victim}: outcomes ok={len(ok)} cut_streams={len(cut_streams)} "
          f"cut_non_streamed={len(cut_plain)}; retried={int(retries[victim])}; down for "
          f"{(up_again - first_down):.1f} s")
