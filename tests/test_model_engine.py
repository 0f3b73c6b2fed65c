"""ReferenceEngine: continuous batching equals per-request generation, seeded sampling, stops, cancel."""

from __future__ import annotations

import threading

import pytest
import torch

from nemovl_trt.checkpoint.config import VLMConfig, parse_vlm_config
from nemovl_trt.checkpoint.presets import preset_config
from nemovl_trt.model.engine import ReferenceEngine, StepOutput, generate
from nemovl_trt.model.random_init import random_init_
from nemovl_trt.model.sampling import SamplingParams, filter_logits
from nemovl_trt.model.vlm import NemotronVLM

VOCAB = 320
IMG_ID = VOCAB - 1


@pytest.fixture(scope="module")
def cfg() -> VLMConfig:
    d = preset_config("tiny")
    d["llm_config"]["vocab_size"] = VOCAB
    d["img_context_token_id"] = IMG_ID
    return parse_vlm_config(d)


@pytest.fixture(scope="module")
def model(cfg) -> NemotronVLM:
    return random_init_(NemotronVLM(cfg), seed=7).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, IMG_ID, (n,), generator=g).tolist() for n in (5, 23, 11, 30, 3)]


def run_all(engine: ReferenceEngine) -> dict[str, list[StepOutput]]:
    events: dict[str, list[StepOutput]] = {}
    for _ in range(1000):
        if not engine.has_work():
            break
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    assert not engine.has_work()
    return events


def tokens(evs: list[StepOutput]) -> list[int]:
    return [e.token_id for e in evs if e.token_id is not None]


def test_batched_engine_equals_per_request_generate(model, prompts):
    params = SamplingParams(max_new_tokens=6)
    single = [generate(model, p, None, params) for p in prompts]
    assert all(len(s) == 6 for s in single)
    assert len({tuple(s) for s in single}) > 1  # prompts lead to different continuations
    engine = ReferenceEngine(model)
    for i, p in enumerate(prompts[:3]):
        engine.add(f"r{i}", p, None, params)
    early = engine.step() + engine.step()
    for i, p in enumerate(prompts[3:], start=3):  # join a running batch
        engine.add(f"r{i}", p, None, params)
    events = run_all(engine)
    for ev in reversed(early):
        events[ev.request_id].insert(0, ev)
    for i in range(len(prompts)):
        evs = events[f"r{i}"]
        assert tokens(evs) == single[i], i
        assert [e.finished for e in evs] == [False] * 5 + [True]
        assert evs[-1].finish_reason == "length" and all(e.finish_reason is None for e in evs[:-1])


def test_seeded_sampling_reproducible_and_batch_independent(model, prompts):
    params = SamplingParams(max_new_tokens=6, temperature=1.3, top_p=0.9, top_k=50, seed=1234)
    alone = generate(model, prompts[1], None, params)
    assert generate(model, prompts[1], None, params) == alone
    assert generate(model, prompts[1], None, SamplingParams(**{**params.__dict__, "seed": 99})) != alone
    assert alone != generate(model, prompts[1], None, SamplingParams(max_new_tokens=6))  # not greedy
    engine = ReferenceEngine(model)
    engine.add("x", prompts[0], None, SamplingParams(max_new_tokens=6, temperature=1.0, seed=5))
    engine.step()
    engine.add("target", prompts[1], None, params)
    engine.add("y", prompts[2], None, SamplingParams(max_new_tokens=4, temperature=0.7, seed=6))
    assert tokens(run_all(engine)["target"]) == alone


def test_stop_tokens_eos_and_ignore_eos(model, prompts):
    greedy = generate(model, prompts[3], None, SamplingParams(max_new_tokens=6))
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    got = generate(model, prompts[3], None, SamplingParams(max_new_tokens=6, stop_token_ids=(stop_at,)))
    assert got == greedy[:first + 1]
    assert generate(model, prompts[3], None, SamplingParams(max_new_tokens=6), eos_ids=[stop_at]) == got
    assert generate(model, prompts[3], None, SamplingParams(max_new_tokens=6, ignore_eos=True),
                    eos_ids=[stop_at]) == greedy
    engine = ReferenceEngine(model, eos_ids=[stop_at])
    engine.add("a", prompts[3], None, SamplingParams(max_new_tokens=6))
    evs = run_all(engine)["a"]
    assert evs[-1] == StepOutput("a", stop_at, True, "stop")


def test_cancel_running_and_pending(model, prompts):
    engine = ReferenceEngine(model)
    engine.add("keep", prompts[0], None, SamplingParams(max_new_tokens=6))
    engine.add("drop", prompts[1], None, SamplingParams(max_new_tokens=50))
    engine.step()
    engine.step()
    engine.cancel("drop")
    engine.add("never", prompts[2], None, SamplingParams(max_new_tokens=5))
    engine.cancel("never")
    engine.cancel("unknown-id")  # ignored
    out = engine.step()
    by_id = {e.request_id: e for e in out}
    assert by_id["drop"] == StepOutput("drop", None, True, "cancelled")
    assert by_id["never"] == StepOutput("never", None, True, "cancelled")
    assert by_id["keep"].token_id is not None and engine.num_running == 1
    rest = run_all(engine)
    assert set(rest) == {"keep"} and rest["keep"][-1].finish_reason == "length"
    engine.add("drop", prompts[1], None, SamplingParams(max_new_tokens=1))  # id is free again
    assert tokens(run_all(engine)["drop"]) == generate(model, prompts[1], None, SamplingParams(max_new_tokens=1))


def test_add_validates(model, cfg, prompts):
    engine = ReferenceEngine(model)
    engine.add("a", prompts[0], None, SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add("a", prompts[0], None, SamplingParams())
    with pytest.raises(ValueError, match="no tokens"):
        engine.add("b", [], None, SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.add("b", prompts[0], None, SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add("b", prompts[0], None, SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add("b", [VOCAB], None, SamplingParams())
    with pytest.raises(ValueError, match="2 image-context tokens but 0"):
        engine.add("b", [1, IMG_ID, IMG_ID], None, SamplingParams())
    with pytest.raises(ValueError, match="at most"):
        engine.add("b", [1] * cfg.max_sequence_length, None, SamplingParams())


def test_image_embeddings_change_generation(model, cfg):
    d = cfg.llm.hidden_size
    ids = [3, 4] + [IMG_ID] * 4 + [5]
    g = torch.Generator().manual_seed(3)
    mm_a, mm_b = torch.randn(4, d, generator=g), torch.randn(4, d, generator=g)
    p = SamplingParams(max_new_tokens=6)
    a, b = generate(model, ids, mm_a, p), generate(model, ids, mm_b, p)
    assert a == generate(model, ids, mm_a, p) and a != b
    engine = ReferenceEngine(model)
    engine.add("a", ids, mm_a, p)
    engine.add("b", ids, mm_b, p)
    ev = run_all(engine)
    assert tokens(ev["a"]) == a and tokens(ev["b"]) == b


def test_chunked_prefill_gives_the_same_tokens(model, prompts):
    params = SamplingParams(max_new_tokens=5)
    engine = ReferenceEngine(model, prefill_chunk=7)  # 30 tokens → 7+7+7+7+2, crossing scan chunks
    engine.add("a", prompts[3], None, params)
    assert tokens(run_all(engine)["a"]) == generate(model, prompts[3], None, params)
    with pytest.raises(ValueError, match="prefill_chunk"):
        ReferenceEngine(model, prefill_chunk=0)


def test_max_seq_len_finishes_with_length(model, prompts):
    engine = ReferenceEngine(model, max_seq_len=len(prompts[0]) + 3)
    engine.add("a", prompts[0], None, SamplingParams(max_new_tokens=100))
    evs = run_all(engine)["a"]
    assert len(evs) == 3 and evs[-1].finish_reason == "length"


def test_add_and_cancel_from_another_thread(model, prompts):
    engine = ReferenceEngine(model)
    engine.add("main", prompts[0], None, SamplingParams(max_new_tokens=10))

    def producer() -> None:
        for i in range(4):
            engine.add(f"t{i}", prompts[i + 1], None, SamplingParams(max_new_tokens=5))
        engine.cancel("t3")

    th = threading.Thread(target=producer)
    th.start()
    events = []
    while th.is_alive() or engine.has_work():
        events.extend(engine.step())
    th.join()
    finished = {e.request_id: e.finish_reason for e in events if e.finished}
    assert set(finished) == {"main", "t0", "t1", "t2", "t3"}
    assert finished["main"] == "length" and finished["t3"] in ("cancelled", "length")


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isfinite(k2).tolist() == [True, True, False, False, False]
    p = filter_logits(logits, 1.0, 0, 0.8)  # 0.5 + 0.2 < 0.8 → keep the third too
    assert torch.isfinite(p).tolist() == [True, True, True, False, False]
    p_small = filter_logits(logits, 1.0, 0, 0.1)  # the best token is always kept
    assert torch.isfinite(p_small).tolist() == [True, False, False, False, False]
    hot = filter_logits(logits, 2.0, 0, 1.0)
    assert torch.allclose(hot, logits / 2)
