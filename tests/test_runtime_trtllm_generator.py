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
