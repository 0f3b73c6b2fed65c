"""ContinuousBatcher (the `llm` model's loop) on the real reference engine, without Triton: joins between
steps, cancellation by id and by a requester that went away, results equal to `generate`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nemovl_trt.runtime.engine_api import GenRequest
from nemovl_trt.runtime.reference_batcher import build_reference_batcher
from nemovl_trt.triton.models import manifest as mf
from nemovl_trt.triton.models.common import read_manifest
from tests.sinks import ListSink


@pytest.fixture(scope="module")
def batcher(cpu_engines_dir: Path):
    b = build_reference_batcher(mf.llm_dir(cpu_engines_dir, read_manifest(cpu_engines_dir)), max_batch_size=4)
    yield b
    b.close()


def _prompt(batcher, text: str) -> list[int]:
    """Byte values of the text shifted into the tiny vocabulary (plain token ids; no media placeholders)."""
    vocab = batcher.engine.model.cfg.llm.vocab_size
    return [20 + (b % (vocab // 2)) for b in text.encode()]


def test_batching_cancel_and_reference_equality(batcher) -> None:
    from nemovl_trt.model.engine import generate
    from nemovl_trt.model.sampling import SamplingParams
    from nemovl_trt.runtime.reference_batcher import sampling_params_from

    opts = {"max_new_tokens": 12, "ignore_eos": True, "seed": 1, "temperature": 0.8}
    a, b, c, d = ListSink(), ListSink(), ListSink(), ListSink(gone_after=3)
    batcher.submit(GenRequest("a", _prompt(batcher, "first prompt"), None, opts, a))
    time.sleep(0.05)  # b and c join while a is decoding
    batcher.submit(GenRequest("b", _prompt(batcher, "second one"), None, opts, b))
    batcher.submit(GenRequest("c", _prompt(batcher, "third, to be cancelled"), None,
                              {**opts, "max_new_tokens": 10_000}, c))
    batcher.submit(GenRequest("d", _prompt(batcher, "client goes away"), None, {**opts, "max_new_tokens": 10_000}, d))
    deadline = time.monotonic() + 30
    while len(c.ids) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.cancel("c")
    for s in (a, b, c, d):
        assert s.done.wait(30)
    assert (a.finish, b.finish, c.finish, d.finish) == ("length", "length", "cancelled", "cancelled")
    assert len(a.ids) == len(b.ids) == 12 and len(c.ids) < 10_000 and len(d.ids) < 10_000
    ref = generate(batcher.engine.model, _prompt(batcher, "second one"), None,
                   sampling_params_from(SamplingParams, opts))
    assert b.ids == ref
    snap = batcher.snapshot()
    assert snap["active"] == [] and snap["max_batch_seen"] >= 3
    assert {"c", "d"} <= set(snap["cancelled_ids"])
    assert not batcher.cancel("a")  # finished requests are unknown


def test_bad_request_fails_alone(batcher) -> None:
    bad, good = ListSink(), ListSink()
    batcher.submit(GenRequest("bad", [], None, {"max_new_tokens": 3}, bad))  # empty prompt
    batcher.submit(GenRequest("good", [21, 22, 23], None, {"max_new_tokens": 3, "ignore_eos": True}, good))
    assert bad.done.wait(30) and good.done.wait(30)
    assert bad.finish.startswith("error:") and good.finish == "length" and len(good.ids) == 3


def test_failing_step_ends_that_request_with_an_error(batcher, monkeypatch) -> None:
    """A request whose sampling raises inside `engine.step` (issue 18: a tiny temperature made
    torch.multinomial raise) ends with an error message; the other request and the thread go on."""
    import dataclasses

    from nemovl_trt.model.engine import ReferenceEngine
    from nemovl_trt.model.sampling import SamplingParams
    from nemovl_trt.runtime.reference_batcher import ContinuousBatcher, sampling_params_from
    from tests.test_model_sampling import FailingGrammar

    def make_sampling(opts: dict) -> SamplingParams:
        params = sampling_params_from(SamplingParams, opts)
        return dataclasses.replace(params, grammar=FailingGrammar(opts["fail_after"])) if "fail_after" in opts \
            else params

    engine = ReferenceEngine(batcher.engine.model, max_batch_size=4)
    own = ContinuousBatcher(engine, make_sampling, 4, batcher.to_tensor)
    try:
        opts = {"max_new_tokens": 10, "ignore_eos": True}
        good, bad = ListSink(), ListSink()
        own.submit(GenRequest("good", _prompt(batcher, "keeps going"), None, opts, good))
        own.submit(GenRequest("bad", _prompt(batcher, "fails mid-stream"), None, {**opts, "fail_after": 4}, bad))
        good.wait(), bad.wait()
        assert bad.ids and len(bad.ids) == 4 and bad.finish == "error:injected sampling failure"
        assert good.finish == "length" and len(good.ids) == 10
        # a failure outside any one request (the whole step raises) fails the running ones, not the thread
        calls = {"n": 0}
        real_step = engine.step

        def step_once_broken():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected step failure")
            return real_step()

        monkeypatch.setattr(engine, "step", step_once_broken)
        hit = ListSink()
        own.submit(GenRequest("hit", _prompt(batcher, "caught in it"), None, opts, hit))
        assert hit.wait().finish == "error:injected step failure" and hit.ids == []
        after = ListSink()
        own.submit(GenRequest("after", _prompt(batcher, "served after"), None, opts, after))
        assert after.wait().finish == "length" and len(after.ids) == 10
        snap = own.snapshot()
        assert snap["failed"] == 2 and snap["completed"] == 2 and snap["active"] == []
        assert own._thread.is_alive()
    finally:
        own.close()


def test_stream_interval_groups_tokens_only_while_several_sequences_run(cpu_engines_dir: Path) -> None:
    """stream_interval 4 from a batch of 2 sequences: a lone request still gets one message per token; two
    running together get their first token alone, then 4 per message, then the rest with the finish reason
    — the same ids as one message per token."""
    from nemovl_trt.model.engine import generate
    from nemovl_trt.model.sampling import SamplingParams
    from nemovl_trt.runtime.reference_batcher import sampling_params_from

    b = build_reference_batcher(mf.llm_dir(cpu_engines_dir, read_manifest(cpu_engines_dir)), max_batch_size=4,
                                stream_interval=4, stream_interval_min_batch=2)
    try:
        opts = {"max_new_tokens": 10, "ignore_eos": True, "temperature": 0.0}
        prompts = {name: _prompt(b, text) for name, text in (("alone", "one at a time"), ("x", "first of two"),
                                                                  ("y", "second of two"))}
        alone = ListSink()
        b.submit(GenRequest("alone", prompts["alone"], None, opts, alone))
        alone.wait()
        x, y = ListSink(), ListSink()
        with b._cond:  # both queued before the batcher's next admission: they run in the same steps
            b.submit(GenRequest("x", prompts["x"], None, opts, x))
            b.submit(GenRequest("y", prompts["y"], None, opts, y))
        x.wait(), y.wait()
        assert alone.sizes == [1] * 10
        assert x.sizes == y.sizes == [1, 4, 4, 1]
        assert (alone.finish, x.finish, y.finish) == ("length", "length", "length")
        for name, sink in (("alone", alone), ("x", x), ("y", y)):
            assert sink.ids == generate(b.engine.model, prompts[name], None, sampling_params_from(SamplingParams, opts))
        assert b.snapshot()["messages"] == 10 + 4 + 4
    finally:
        b.close()


def test_stream_interval_below_one_is_refused(cpu_engines_dir: Path) -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        build_reference_batcher(mf.llm_dir(cpu_engines_dir, read_manifest(cpu_engines_dir)), max_batch_size=2,
                                stream_interval=0)
