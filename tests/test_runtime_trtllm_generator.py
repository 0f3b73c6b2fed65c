"""TrtllmGenerator and our input processor against the FAKE tensorrt_llm (tests/fake_tensorrt_llm.py), whose
names, signatures and routing come from TensorRT-LLM's source (tests/data/upstream/tensorrt_llm.json).
Not a GPU test: it proves our calls fit TensorRT-LLM's contract, not that TensorRT-LLM runs the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nemovl_trt.build.bundle_contents import complete_bundle
from nemovl_trt.build.plan import plan_memory
from nemovl_trt.build.targets import load_target
from nemovl_trt.build.trtllm_bundle import convert_checkpoint_dtype, llm_api_options
from nemovl_trt.checkpoint.config import load_vlm_config
from nemovl_trt.runtime import trtllm_generator as tg
from nemovl_trt.runtime.engine_api import GenRequest
from nemovl_trt.runtime.trtllm_processor import install_embeddings_processor
from tests import fake_tensorrt_llm as fake
from tests.sinks import ListSink

IMG = 1500


@pytest.fixture(scope="module")
def bundle(tiny_ckpt_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A bf16 GPU bundle as `engines --target h100` lays it out (weights converted, remote config added)
    and the h100 LLM-API options from the plan."""
    out = tmp_path_factory.mktemp("bundle") / "llm"
    convert_checkpoint_dtype(tiny_ckpt_dir, out, "bfloat16")
    complete_bundle(tiny_ckpt_dir, out)
    target = load_target("h100")
    return out, llm_api_options(target, plan_memory(load_vlm_config(tiny_ckpt_dir), target))


@pytest.fixture()
def trtllm(monkeypatch):
    monkeypatch.setattr(tg, "cuda_available", lambda: True)  # the fake stands for a GPU host
    return fake.install(monkeypatch)


@pytest.fixture()
def gen(trtllm, bundle):
    g = tg.TrtllmGenerator(bundle[0], bundle[1], cancel_poll_s=0.005)
    yield g
    g.close()


def _image_prompt(rows: int) -> list[int]:
    return [1, 30, 31, *([IMG] * rows), 40, 41]


def test_without_tensorrt_llm_one_clear_error(bundle, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tensorrt_llm", None)
    with pytest.raises(RuntimeError, match=r"^this target needs tensorrt_llm and an NVIDIA GPU; none found"):
        tg.TrtllmGenerator(bundle[0], bundle[1])


def test_old_call_is_rejected_and_upstream_nano_processor_refuses_embeddings(trtllm, bundle) -> None:
    """Today's call before this change: a bare float32 tensor under multi_modal_embeddings with token ids.
    Upstream's own Nano processor decodes the ids and refuses embedding input; ours refuses the bare tensor."""
    llm = trtllm.LLM(model=str(bundle[0]), **bundle[1])  # upstream's processor only
    ids = _image_prompt(4)
    old = {"prompt_token_ids": ids, "multi_modal_embeddings": torch.zeros(4, 128)}
    with pytest.raises(NotImplementedError, match="does not support multimodal embedding input"):
        llm.generate_async(old, sampling_params=trtllm.SamplingParams(max_tokens=2), streaming=True)
    with pytest.raises(NotImplementedError, match="does not support multimodal embedding input"):
        llm.generate_async({"prompt_token_ids": ids, "multi_modal_embeddings": {"image": [torch.zeros(4, 128)]}},
                           sampling_params=trtllm.SamplingParams(max_tokens=2), streaming=True)
    install_embeddings_processor()
    llm = trtllm.LLM(model=str(bundle[0]), **bundle[1])
    with pytest.raises(ValueError, match="dict keyed by modality"):
        llm.generate_async(old, sampling_params=trtllm.SamplingParams(max_tokens=2), streaming=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_new_tokens'"):
        trtllm.SamplingParams(max_new_tokens=2)  # our engine-neutral name is not upstream's


def test_image_rows_reach_the_model_in_bf16_and_stream_as_deltas(gen) -> None:
    rows = np.arange(4 * 128, dtype=np.float32).reshape(4, 128) / 100
    sink = ListSink()
    gen.submit(GenRequest("img", _image_prompt(4), rows, {"max_new_tokens": 5, "seed": None}, sink))
    sink.wait()
    llm = fake.FakeLLM.instances[-1]
    fused = llm.fused[-1]
    assert fused.dtype == torch.bfloat16 and tuple(fused.shape) == (4, 128)
    assert torch.equal(fused, torch.from_numpy(rows).to(torch.bfloat16))
    # scripted fake output: rows fused, then prompt[-1] + k; deltas only, 5 tokens, "length"
    assert sink.ids == [4, 42, 43, 44, 45] and sink.finish == "length" and sink.calls == 5
    assert gen.snapshot()["completed"] == 1 and gen.snapshot()["active"] == []


def test_text_only_stop_token_is_emitted_and_greedy_is_top_k_1(gen) -> None:
    sink = ListSink()
    gen.submit(GenRequest("txt", [5, 6, 7], None, {"max_new_tokens": 10, "stop_token_ids": [9],
                                                   "temperature": 0.0}, sink))
    sink.wait()
    assert fake.FakeLLM.instances[-1].fused[-1] is None
    assert sink.ids == [0, 8, 9] and sink.finish == "stop"  # the stop id is kept, as the reference engine does


def test_eos_from_generation_config_ends_with_stop_unless_ignored(gen, bundle) -> None:
    import json

    eos = json.loads((bundle[0] / "generation_config.json").read_text())["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    start = eos - 2  # prompt[-1] + 2 == eos
    a, b = ListSink(), ListSink()
    gen.submit(GenRequest("eos", [start], None, {"max_new_tokens": 6}, a))
    gen.submit(GenRequest("ign", [start], None, {"max_new_tokens": 4, "ignore_eos": True}, b))
    a.wait(), b.wait()
    assert a.ids == [0, start + 1] and a.finish == "stop"
    assert b.ids == [0, start + 1, eos, eos + 1] and b.finish == "length"


def test_cancel_by_id_and_by_a_requester_that_left(gen) -> None:
    a, b = ListSink(), ListSink(gone_after=2)
    gen.submit(GenRequest("a", [5, 6], None, {"max_new_tokens": 100_000}, a))
    gen.submit(GenRequest("b", [5, 6], None, {"max_new_tokens": 100_000}, b))
    assert b.wait().finish == "cancelled"
    assert gen.cancel("a") is True
    assert a.wait().finish == "cancelled"
    assert gen.cancel("a") is False and gen.cancel("never") is False
    snap = gen.snapshot()
    assert snap["cancelled"] == 2 and set(snap["cancelled_ids"]) == {"a", "b"} and snap["active"] == []


def test_errors_go_to_that_request_only(gen) -> None:
    bad, good = ListSink(), ListSink()
    rows = np.zeros((3, 128), np.float32)
    gen.submit(GenRequest("bad", _image_prompt(4), rows, {"max_new_tokens": 3}, bad))  # 4 slots, 3 rows
    gen.submit(GenRequest("good", [5], None, {"max_new_tokens": 2}, good))
    assert bad.wait().finish.startswith("error:") and "4 image-context tokens" in bad.finish
    assert good.wait().finish == "length" and good.ids == [0, 6]
    worse = ListSink()
    gen.submit(GenRequest("worse", [5], None, {"max_new_tokens": 2, "temperature": -1}, worse))
    assert worse.wait().finish.startswith("error:") and "temperature" in worse.finish  # upstream's check
    assert gen.snapshot()["failed"] == 2


def test_close_shuts_the_llm_down_and_stops_the_loop(trtllm, bundle) -> None:
    g = tg.TrtllmGenerator(bundle[0], bundle[1])
    g.close()
    assert fake.FakeLLM.instances[-1].shut_down is True
    assert not g._thread.is_alive()


def test_bundle_without_remote_config_or_trust_remote_code_does_not_load(trtllm, bundle, tmp_path) -> None:
    import json
    import shutil

    broken = tmp_path / "llm"
    shutil.copytree(bundle[0], broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["auto_map"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError):  # transformers: unknown model type NemotronH_Nano_VL_V2
        tg.TrtllmGenerator(broken, bundle[1])
    with pytest.raises(ValueError):
        tg.TrtllmGenerator(bundle[0], {**bundle[1], "trust_remote_code": False})


def test_options_are_validated_like_upstream(trtllm, bundle) -> None:
    from tests.upstream_contract import UpstreamContractError

    bad_kv = {**bundle[1], "kv_cache_config": {**bundle[1]["kv_cache_config"], "free_gpu_mem": 0.5}}
    with pytest.raises(UpstreamContractError, match="KvCacheConfig has no field 'free_gpu_mem'"):
        tg.TrtllmGenerator(bundle[0], bad_kv)
    with pytest.raises(UpstreamContractError, match="TorchLlmArgs has no field 'enable_mm_embeddings'"):
        tg.TrtllmGenerator(bundle[0], {**bundle[1], "enable_mm_embeddings": True})


# ---------------------------------------------------------------- choices, logprobs, structured output
def _run(gen, sampling: dict, prompt: list[int] | None = None, rid: str = "r") -> ListSink:
    sink = ListSink()
    gen.submit(GenRequest(rid, prompt or [5, 6, 7], None, sampling, sink))
    return sink.wait()


def test_n3_streams_three_choices_with_their_indices_and_finish_reasons(gen) -> None:
    # fake sequence j: [0, 7 + k + 100 j ...]; sequence 1 meets the stop id 109 after 3 tokens
    sink = _run(gen, {"max_new_tokens": 4, "n": 3, "temperature": 0.8, "seed": 5, "stop_token_ids": [109]})
    sp = fake.FakeLLM.instances[-1].params[-1]
    assert (sp.n, sp.best_of, sp.temperature, sp.seed) == (3, 3, 0.8, 5)
    assert sink.by_choice == {0: [0, 8, 9, 10], 1: [0, 108, 109], 2: [0, 208, 209, 210]}
    # upstream names a finish reason only on the response that ends the request: the others are inferred
    assert sink.finishes == {0: "length", 1: "stop", 2: "length"}
    assert sink.calls == 4 + 3 + 4  # one message per streamed token, the finish on the last one
    assert gen.snapshot()["completed"] == 1 and gen.snapshot()["active"] == []


def test_greedy_n_is_one_sequence_sent_as_every_choice(gen) -> None:
    """Upstream refuses best_of > 1 under greedy decoding; greedy choices are all the same sequence."""
    sink = _run(gen, {"max_new_tokens": 3, "n": 3, "temperature": 0.0})
    sp = fake.FakeLLM.instances[-1].params[-1]
    assert (sp.n, sp.best_of, sp.top_k) == (1, 1, 1)
    assert sink.by_choice == {0: [0, 8, 9], 1: [0, 8, 9], 2: [0, 8, 9]}
    assert sink.finishes == {0: "length", 1: "length", 2: "length"}
    with pytest.raises(ValueError, match="does not allow multiple returns"):  # the fake keeps upstream's rule
        fake.FakeSamplingParams(n=2, top_k=1)


def test_logprobs_are_mapped_to_the_engine_format(gen) -> None:
    sink = _run(gen, {"max_new_tokens": 4, "temperature": 0.5, "logprobs": 2})
    assert fake.FakeLLM.instances[-1].params[-1].logprobs == 2
    ids = sink.by_choice[0]
    assert ids == [0, 8, 9, 10]
    lps = sink.logprobs[0]
    assert len(lps) == 4 and [len(e[1]) for e in lps] == [2, 2, 2, 2]
    lp = [fake.fake_logprob(0, k, 1) for k in range(4)]  # -0.5, -0.51, ...
    # even positions: the sampled token is the best; odd ones: two better alternatives, it is not in the top 2
    assert lps[0] == [pytest.approx(lp[0]), [[0, pytest.approx(lp[0])], [900, pytest.approx(lp[0] - 0.1)]]]
    assert lps[1] == [pytest.approx(lp[1]), [[900, pytest.approx(lp[1] + 0.2)], [901, pytest.approx(lp[1] + 0.1)]]]
    assert [e[0] for e in lps] == pytest.approx(lp)
    zero = _run(gen, {"max_new_tokens": 3, "temperature": 0.5, "logprobs": 0}, rid="z")
    # upstream 1.2 turns logprobs on with bool(logprobs): 0 is sent as 1 and the alternatives are cut
    assert fake.FakeLLM.instances[-1].params[-1].logprobs == 1
    assert [e[1] for e in zero.logprobs[0]] == [[], [], []]
    assert [e[0] for e in zero.logprobs[0]] == pytest.approx(lp[:3])
    plain = _run(gen, {"max_new_tokens": 2, "temperature": 0.5}, rid="p")
    assert plain.logprobs == {} and fake.FakeLLM.instances[-1].params[-1].logprobs is None


def test_logprobs_of_each_choice_follow_its_own_tokens(gen) -> None:
    sink = _run(gen, {"max_new_tokens": 3, "n": 2, "temperature": 1.0, "logprobs": 1})
    for j in (0, 1):
        assert [e[0] for e in sink.logprobs[j]] == pytest.approx([fake.fake_logprob(j, k, 2) for k in range(3)])
        assert len(sink.logprobs[j]) == len(sink.by_choice[j]) == 3


def test_prompt_logprobs_are_aligned_to_the_prompt_tokens(gen) -> None:
    sink = _run(gen, {"max_new_tokens": 2, "temperature": 0.5, "prompt_logprobs": 1})
    # upstream position t predicts token t + 1; ours: one entry per prompt token, the first None
    assert sink.prompt_logprobs == [None, [pytest.approx(-0.25), [[6, pytest.approx(-0.25)]]],
                                    [pytest.approx(-0.5), [[7, pytest.approx(-0.5)]]]]


@pytest.mark.parametrize(("n", "expected"), [(1, {0: [0, 208, 209, 210]}),
                                             (2, {0: [0, 208, 209, 210], 1: [0, 108, 109, 110]})])
def test_best_of_returns_the_n_likeliest_sequences(gen, n: int, expected: dict) -> None:
    """The fake's later sequences are the likelier ones: upstream's ranking reverses the order."""
    sink = _run(gen, {"max_new_tokens": 4, "n": n, "best_of": 3, "temperature": 1.0})
    sp = fake.FakeLLM.instances[-1].params[-1]
    assert (sp.n, sp.best_of, sp.logprobs) == (n, 3, 1)  # logprobs on: ranking needs cumulative_logprob
    assert sink.by_choice == expected and set(sink.finishes.values()) == {"length"}
    assert sink.logprobs == {}  # asked for ranking only: not sent
    assert sink.calls == n  # sent once, when ranked
    bad = _run(gen, {"max_new_tokens": 4, "n": 3, "best_of": 2, "temperature": 1.0}, rid="bad")
    assert bad.finish.startswith("error:[invalid_parameter] best_of (2) must be at least n (3)")


def test_negative_seed_is_sent_modulo_2_64(gen) -> None:
    _run(gen, {"max_new_tokens": 1, "temperature": 1.0, "seed": -5})
    assert fake.FakeLLM.instances[-1].params[-1].seed == 2**64 - 5
    _run(gen, {"max_new_tokens": 1, "temperature": 1.0, "seed": 2**63 - 1}, rid="big")
    assert fake.FakeLLM.instances[-1].params[-1].seed == 2**63 - 1
    with pytest.raises(TypeError, match="uint64"):  # what the bindings do with a negative seed
        fake.FakeSamplingParams(seed=-5)


def test_structured_output_reaches_sampling_params_as_our_grammar(gen, bundle) -> None:
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer
    from nemovl_trt.model.grammar import grammar_text

    special = load_tokenizer(bundle[0]).special
    ids = {t: special[t] for t in ("<TOOLCALL>", "</TOOLCALL>", "</think>")}
    llm = fake.FakeLLM.instances[-1]
    specs = [{"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                "required": ["a"]}, "strict": True},
             {"type": "json_object"},
             {"type": "tool_calls", "tools": [{"name": "get", "parameters": {"type": "object"}}]},
             {"type": "tool_calls", "tools": [{"name": "get", "parameters": None}], "reasoning": True}]
    for i, spec in enumerate(specs):
        sink = _run(gen, {"max_new_tokens": 2, "temperature": 0.7, "guided": spec}, rid=f"g{i}")
        assert not sink.finish.startswith("error:"), sink.finish
        guide = llm.params[-1].guided_decoding
        assert guide.kwargs == {"grammar": grammar_text(spec, ids)}  # the cpu engine's grammar, tokens by id
    assert f"<[{ids['<TOOLCALL>']}]>" in llm.params[-2].guided_decoding.grammar
    assert len(llm.matchers) == len(specs)  # each compiled by llguidance for the bundle's tokenizer


def test_xgrammar_backend_takes_json_only(trtllm, bundle) -> None:
    g = tg.TrtllmGenerator(bundle[0], {**bundle[1], "guided_decoding_backend": "xgrammar"}, cancel_poll_s=0.005)
    try:
        ok = _run(g, {"max_new_tokens": 2, "guided": {"type": "json_schema", "schema": {"type": "object"}}})
        assert not ok.finish.startswith("error:")
        assert fake.FakeLLM.instances[-1].params[-1].guided_decoding.kwargs == {"json": {"type": "object"}}
        tool = _run(g, {"max_new_tokens": 2, "guided": {"type": "tool_calls", "tools": [{"name": "f"}]}}, rid="t")
        assert tool.finish.startswith("error:[unsupported_parameter] a forced tool call")
    finally:
        g.close()


def test_cancel_ends_every_choice_once(gen) -> None:
    sink = ListSink()
    gen.submit(GenRequest("c", [5, 6], None, {"max_new_tokens": 100_000, "n": 3, "temperature": 1.0}, sink))
    while len(sink.ids) < 6:
        sink.done.wait(0.01)
    assert gen.cancel("c") is True
    sink.wait()
    assert sink.finishes == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
    assert gen.snapshot()["cancelled"] == 1


@pytest.mark.parametrize(("symbol_name", "field", "sampling"), [
    ("tensorrt_llm.executor.result.CompletionOutput", "cumulative_logprob",
     {"max_new_tokens": 2, "best_of": 2, "temperature": 1.0}),
    ("tensorrt_llm.executor.result.CompletionOutput", "logprobs",
     {"max_new_tokens": 2, "logprobs": 1, "temperature": 1.0}),
    ("tensorrt_llm.executor.result.CompletionOutput", "index", {"max_new_tokens": 2, "n": 2, "temperature": 1.0}),
    ("tensorrt_llm.executor.result.Logprob", "rank", {"max_new_tokens": 2, "logprobs": 1, "temperature": 1.0}),
    ("tensorrt_llm.SamplingParams", "best_of", {"max_new_tokens": 2, "best_of": 2, "temperature": 1.0}),
    ("tensorrt_llm.sampling_params.GuidedDecodingParams", "grammar",
     {"max_new_tokens": 2, "guided": {"type": "json_object"}}),
])
def test_a_name_drift_in_the_recorded_upstream_data_fails(gen, monkeypatch, symbol_name: str, field: str,
                                                          sampling: dict) -> None:
    """The fake exposes only what tests/data/upstream/tensorrt_llm.json records: if upstream renamed one of
    the names we use (and the data were updated from its source), our generator fails here."""
    from tests.upstream_contract import upstream

    monkeypatch.delitem(upstream("tensorrt_llm")["symbols"][symbol_name]["fields"], field)
    sink = _run(gen, sampling)
    assert sink.finish.startswith("error:") and field in sink.finish, sink.finish
