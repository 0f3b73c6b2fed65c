"""Our GPU-side code uses only names that exist upstream (tests/data/upstream/*.json, read from TensorRT-LLM,
TensorRT and ModelOpt's source with file and commit per name). A renamed or removed upstream name, or a
typo on our side, fails here on CPU. The FAKE libraries (tests/fake_*.py) enforce the same data at call
time; these tests drive the TensorRT build and the ModelOpt quantization through them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from nemovl_trt.build.bundle_contents import check_bundle, complete_bundle
from nemovl_trt.build.plan import plan_memory
from nemovl_trt.build.targets import load_target
from nemovl_trt.build.trtllm_bundle import UNQUANTIZED_MODULES, llm_api_options, quantize_and_export
from nemovl_trt.checkpoint.config import load_vlm_config
from nemovl_trt.checkpoint.presets import preset_config
from nemovl_trt.runtime import trtllm_generator, trtllm_processor
from nemovl_trt.runtime.trtllm_requests import prompt_inputs, sampling_kwargs
from tests import fake_modelopt, fake_tensorrt
from tests import fake_tensorrt_llm as fake_llm
from tests.upstream_contract import LIBRARIES, fields, members, signature, symbol, upstream

GPU_TARGETS = ("a100", "l40s", "h100", "b200")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("lib", LIBRARIES)
def test_every_recorded_name_says_where_it_came_from(lib: str) -> None:
    data = upstream(lib)
    assert data["repository"].startswith("NVIDIA/") and data["version"] and data["read"]
    assert len(data["symbols"]) >= 10
    for name, s in data["symbols"].items():
        assert re.fullmatch(r"[0-9a-f]{40}", s["commit"]), name
        assert s["file"] and not s["file"].startswith("/"), name
        assert s["kind"] in ("class", "function", "method", "enum", "constant", "module"), name


@pytest.fixture(scope="module")
def real_config(tmp_path_factory):
    """The real 12B config (for planning) as a VLMConfig."""
    d = tmp_path_factory.mktemp("12b")
    (d / "config.json").write_text(json.dumps(preset_config("12b-config")))
    return load_vlm_config(d)


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_llm_api_options_use_only_upstream_fields(name: str, real_config) -> None:
    target = load_target(name)
    opts = llm_api_options(target, plan_memory(real_config, target))
    torch_args = fields("tensorrt_llm", "tensorrt_llm.llmapi.llm_args.TorchLlmArgs")
    assert set(opts) - {"backend"} <= torch_args, set(opts) - torch_args
    assert opts["backend"] == "pytorch" and opts["trust_remote_code"] is True
    assert set(opts["kv_cache_config"]) <= fields("tensorrt_llm", "tensorrt_llm.llmapi.llm_args.KvCacheConfig")
    kv_literal = symbol("tensorrt_llm", "tensorrt_llm.llmapi.llm_args.KvCacheConfig")["fields"]["mamba_ssm_cache_dtype"]
    assert repr(opts["kv_cache_config"]["mamba_ssm_cache_dtype"]) in kv_literal["type"]
    cg = opts["cuda_graph_config"]
    assert set(cg) <= fields("tensorrt_llm", "tensorrt_llm.llmapi.llm_args.CudaGraphConfig")
    # upstream derives cuda_graph_config.max_batch_size = max(batch_sizes) (and rejects a different one):
    # we do not set it, and our largest graph is the engine's max batch
    assert "max_batch_size" not in cg and max(cg["batch_sizes"]) == opts["max_batch_size"]
    assert cg["batch_sizes"] == sorted(set(cg["batch_sizes"]))
    # chunked prefill on: a 128-frame video (> 30K tokens) runs in max_num_tokens-sized chunks
    assert opts["enable_chunked_prefill"] is True and opts["max_num_tokens"] < opts["max_seq_len"]
    # the serving config's stream interval, as upstream's int field (default 1, must be > 0)
    si = symbol("tensorrt_llm", "tensorrt_llm.llmapi.llm_args.TorchLlmArgs")["fields"]["stream_interval"]
    assert (si["type"], si["default"]) == ("int", "1") and opts["stream_interval"] == target.serving.stream_interval == 4


@pytest.mark.parametrize("opts", [
    {"max_new_tokens": 1},
    {"max_new_tokens": 8, "temperature": 0.8, "top_p": 0.5, "top_k": 7, "seed": 2**63, "stop_token_ids": [3, 4],
     "ignore_eos": True},
    {"max_new_tokens": 8, "temperature": 0.0, "seed": None, "stop_token_ids": []},
])
def test_sampling_params_fields_exist_upstream(opts: dict) -> None:
    kw = sampling_kwargs(opts)
    assert set(kw) <= fields("tensorrt_llm", "tensorrt_llm.SamplingParams"), set(kw)
    fake_llm.FakeSamplingParams(**kw)  # and the keyword-only constructor takes them


FakeGuidedDecodingParams = fake_llm.FakeGuidedDecodingParams
SPECIAL = {"<TOOLCALL>": 1506, "</TOOLCALL>": 1507, "</think>": 1505}


@pytest.mark.parametrize("opts", [
    {"max_new_tokens": 4, "frequency_penalty": 0.5, "presence_penalty": -1.0, "repetition_penalty": 1.2},
    {"max_new_tokens": 4, "logit_bias": {"3": -100.0, "7": 2.5}, "vocab_size": 16},
    {"max_new_tokens": 4, "guided": {"type": "json_schema", "schema": {"type": "object"}, "strict": True}},
    {"max_new_tokens": 4, "guided": {"type": "json_object"}, "temperature": 0.5, "seed": 3},
    {"max_new_tokens": 4, "guided": {"type": "tool_calls", "tools": [{"name": "f", "parameters": None}]}},
    {"max_new_tokens": 4, "n": 3, "best_of": 5, "temperature": 0.9, "logprobs": 0, "prompt_logprobs": 2},
    {"max_new_tokens": 4, "n": 4, "temperature": 0.0, "logprobs": 20, "seed": -(2**63)},
])
def test_every_mapped_sampling_option_is_an_upstream_field(opts: dict) -> None:
    from nemovl_trt.model.grammar import grammar_text

    kw = sampling_kwargs(opts, guided_params=FakeGuidedDecodingParams, special_ids=SPECIAL)
    assert set(kw) <= fields("tensorrt_llm", "tensorrt_llm.SamplingParams"), set(kw)
    fake_llm.FakeSamplingParams(**kw)
    if "logit_bias" in opts:  # upstream has no logit_bias: embedding_bias, a float32 tensor over the vocabulary
        bias = kw["embedding_bias"]
        assert bias.dtype == torch.float32 and bias.shape == (16,)
        assert bias[3] == -100.0 and bias[7] == 2.5 and float(bias.abs().sum()) == 102.5
    if "guided" in opts:  # llguidance backend (our bundles): the cpu engine's Lark grammar, tokens by id
        assert kw["guided_decoding"].kwargs == {"grammar": grammar_text(opts["guided"], SPECIAL)}
        if opts["guided"]["type"] != "tool_calls":  # xgrammar: json / json_object only
            xg = sampling_kwargs(opts, guided_params=FakeGuidedDecodingParams, grammar_backend="xgrammar")
            want = {"json": {"type": "object"}} if opts["guided"]["type"] == "json_schema" else {"json_object": True}
            assert xg["guided_decoding"].kwargs == want
    for key in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        if key in opts:
            assert kw[key] == opts[key]
    if opts.get("best_of"):  # sampling: n and best_of as they are; logprobs 0 asked as 1 (0 = off in 1.2)
        assert (kw["n"], kw["best_of"], kw["logprobs"], kw["prompt_logprobs"]) == (3, 5, 1, 2)
    if opts.get("n") == 4:  # greedy: one sequence (upstream refuses best_of > 1), the seed as a uint64
        assert "n" not in kw and "best_of" not in kw and kw["logprobs"] == 20 and kw["seed"] == 2**63


@pytest.mark.parametrize(("opts", "backend", "special", "what"), [
    ({"guided": {"type": "tool_calls", "tools": [{"name": "f"}]}}, "xgrammar", SPECIAL, "forced tool call"),
    ({"guided": {"type": "json_object", "reasoning": True}}, "xgrammar", SPECIAL, "thinking block"),
    ({"guided": {"type": "tool_calls", "tools": [{"name": "f"}]}}, "llguidance", {}, "no </TOOLCALL>, <TOOLCALL>"),
    ({"guided": {"type": "json_object"}}, "outlines", SPECIAL, "guided_decoding_backend 'outlines'"),
    ({"logit_bias": {"1": 1.0}}, "llguidance", SPECIAL, "logit_bias"),
])
def test_options_the_gpu_path_cannot_honour_are_refused_clearly(opts: dict, backend: str, special: dict,
                                                                what: str) -> None:
    from nemovl_trt.runtime.trtllm_requests import UnsupportedOnTrtllm

    with pytest.raises(UnsupportedOnTrtllm) as e:
        sampling_kwargs({"max_new_tokens": 4, **opts}, guided_params=FakeGuidedDecodingParams,
                        grammar_backend=backend, special_ids=special)
    assert str(e.value).startswith("[unsupported_parameter] ") and what in str(e.value)


def test_logprob_names_we_read_are_recorded() -> None:
    """trtllm_requests reads Logprob.logprob / .rank of TokenLogprobs entries; the generator reads the
    CompletionOutput fields below (and the fake exposes only recorded names)."""
    assert {"logprob", "rank"} <= fields("tensorrt_llm", "tensorrt_llm.executor.result.Logprob")
    assert {"index", "token_ids", "logprobs", "prompt_logprobs", "cumulative_logprob", "finish_reason"} <= \
        fields("tensorrt_llm", "tensorrt_llm.executor.result.CompletionOutput")
    assert {"n", "best_of", "logprobs", "prompt_logprobs", "guided_decoding", "seed"} <= \
        fields("tensorrt_llm", "tensorrt_llm.SamplingParams")
    assert "grammar" in fields("tensorrt_llm", "tensorrt_llm.sampling_params.GuidedDecodingParams")
    assert "grammar_from_lark" in symbol("tensorrt_llm", "tensorrt_llm._torch.pyexecutor.grammar_matcher."
                                         "LLGuidanceMatcherFactory")["notes"]


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_guided_decoding_backend_is_an_accepted_value(name: str, real_config) -> None:
    target = load_target(name)
    opts = llm_api_options(target, plan_memory(real_config, target))
    recorded = symbol("tensorrt_llm", "tensorrt_llm.llmapi.llm_args.TorchLlmArgs")["fields"]["guided_decoding_backend"]
    assert repr(opts["guided_decoding_backend"]) in recorded["type"]  # Literal['xgrammar', 'llguidance']


def test_prompt_keys_are_the_ones_upstream_reads() -> None:
    read = members("tensorrt_llm", "tensorrt_llm.llmapi.llm.BaseLLM._preprocess")
    assert set(prompt_inputs([1, 2], torch.zeros(1, 4))) <= read
    assert "prompt_token_ids" in fields("tensorrt_llm", "tensorrt_llm.inputs.data.TokensPrompt")


def test_our_processor_overrides_only_upstream_hooks() -> None:
    base = members("tensorrt_llm", "tensorrt_llm.inputs.registry.BaseMultimodalInputProcessor")
    assert set(trtllm_processor.REQUIRED_BASE_MEMBERS) <= base
    ours = trtllm_processor.make_embeddings_processor(fake_llm.FakeNanoV2VLInputProcessor)
    defined = {n for n in vars(ours) if not n.startswith("__")} - {"_hf_config"}
    assert defined <= base, defined - base
    hook = signature("tensorrt_llm", "tensorrt_llm.inputs.registry.BaseMultimodalInputProcessor."
                     "_attach_multimodal_embeddings_impl")
    assert list(hook.parameters) == ["inputs", "multimodal_embedding", "sampling_params"]
    nano = symbol("tensorrt_llm", "tensorrt_llm._torch.models.modeling_nemotron_nano")
    assert {trtllm_processor.UPSTREAM_PROCESSOR_CLASS, trtllm_processor.UPSTREAM_MODEL_CLASS} <= set(nano["members"])
    assert nano["file"] == trtllm_processor.UPSTREAM_MODEL_MODULE.replace(".", "/") + ".py"
    assert trtllm_processor.EMBEDDING_KEY in nano["notes"]  # the key the model's forward reads


def _attributes_used(path: Path, owner: str) -> set[str]:
    """Attribute names read on `<owner>.` in a source file (e.g. owner "self.llm")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == owner:
            names.add(node.attr)
    return names


def test_the_generator_reads_only_recorded_output_names() -> None:
    src = Path(trtllm_generator.__file__)
    assert _attributes_used(src, "self.llm") <= members("tensorrt_llm", "tensorrt_llm.LLM")
    assert _attributes_used(src, "out") <= members("tensorrt_llm", "tensorrt_llm.llmapi.llm.RequestOutput")
    assert _attributes_used(src, "run.result") <= members("tensorrt_llm", "tensorrt_llm.llmapi.llm.RequestOutput")
    assert _attributes_used(src, "completion") <= fields("tensorrt_llm", "tensorrt_llm.executor.result.CompletionOutput")
    assert _attributes_used(src, "trtllm") <= {"LLM", "SamplingParams"}
    assert {"sampling_params", "streaming"} <= set(signature("tensorrt_llm", "tensorrt_llm.LLM.generate_async").parameters)


def test_vision_engine_build_calls_only_recorded_tensorrt_api(monkeypatch, tmp_path) -> None:
    from nemovl_trt.build import tensorrt_build as tb

    monkeypatch.setattr(tb, "require_gpu", lambda target, module, what: fake_tensorrt.module())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    plan, cache = tmp_path / "vision" / "model.plan", tmp_path / "vision" / "timing.cache"
    tb.build_vision_engine(load_target("h100"), onnx, plan, cache, "pixel_values", 512, tb.TrtProfile(1, 13, 26))
    built = json.loads(plan.read_bytes())
    assert built["fake_plan"] and built["onnx"] == "model.onnx" and built["strongly_typed"] is True
    assert built["pools"] == {str(int(fake_tensorrt.MemoryPoolType.WORKSPACE)): tb.WORKSPACE_BYTES}
    assert built["profiles"] == [{"pixel_values": [[1, 3, 512, 512], [13, 3, 512, 512], [26, 3, 512, 512]]}]
    assert cache.read_bytes() == b"fake-timing-cache"
    # a second build reuses the cache file it wrote
    tb.build_vision_engine(load_target("h100"), onnx, plan, cache, "pixel_values", 512, tb.TrtProfile(1, 1, 1))
    with pytest.raises(RuntimeError, match="could not parse model.onnx"):
        tb.build_vision_engine(load_target("h100"), tmp_path / "missing" / "model.onnx", plan, cache,
                               "pixel_values", 512, tb.TrtProfile(1, 1, 1))


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(2000, 4)
        self.seen: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(input_ids.numel()))
        return self.embed(input_ids)


class _TinyVLM(torch.nn.Module):
    """Stands for the HF model object: a language_model that takes input_ids, plus its config dict."""

    def __init__(self, hf_config: dict) -> None:
        super().__init__()
        self.language_model = _TinyLM()
        self.vision_model = torch.nn.Linear(4, 4)
        self.hf_config = hf_config


def test_modelopt_quantizes_the_language_model_and_the_bundle_is_completed(tiny_ckpt_dir, tmp_path) -> None:
    from nemovl_trt.checkpoint.loader import load_checkpoint

    mtq, export = fake_modelopt.modules()
    model = _TinyVLM(json.loads((tiny_ckpt_dir / "config.json").read_text()))
    tok = load_checkpoint(tiny_ckpt_dir).tokenizer

    def tokenizer(text, return_tensors):
        assert return_tensors == "pt"
        return type("Enc", (), {"input_ids": torch.tensor([tok.encode(text)])})()

    out = tmp_path / "llm"
    quantize_and_export(mtq, export.export_hf_checkpoint, model, tokenizer, out, "fp8", device="cpu")
    assert fake_modelopt.Calls.calibrated_with[-1] is model.language_model and len(model.language_model.seen) == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["exclude_modules"] == ["lm_head", *UNQUANTIZED_MODULES]
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["exclude_modules"] == ["lm_head", *UNQUANTIZED_MODULES]
    with pytest.raises(Exception, match="auto_map|preprocessor_config|tokenizer"):
        check_bundle(out)  # ModelOpt's export alone is not loadable by TensorRT-LLM
    added = {p.name for p in complete_bundle(tiny_ckpt_dir, out)}
    assert {"configuration_nemovl_vl.py", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "config.json"} <= added
    check_bundle(out, {"trust_remote_code": True})
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_algo"] == "FP8"
