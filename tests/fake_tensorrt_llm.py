"""FAKE tensorrt_llm for the CPU tests — not TensorRT-LLM. It cannot run a model; it enforces TensorRT-LLM's
contract as recorded from its source in tests/data/upstream/tensorrt_llm.json:

- `LLM(model, **kwargs)`: the recorded `LLM.__init__` signature; every kwarg a `TorchLlmArgs` field (or
  `backend`), nested `kv_cache_config` / `cuda_graph_config` keys their classes' fields (extra='forbid'),
  the CUDA-graph batch-size rule; the bundle's config loaded with the real transformers
  `AutoConfig.from_pretrained(model, trust_remote_code=...)`, as upstream's `create_input_processor` does;
  the input processor looked up by model class in the registry that `register_input_processor` fills.
- `generate_async(inputs, ...)`: the recorded signature and prompt keys, upstream's routing of
  `prompt_token_ids` / `multi_modal_embeddings` to `attach_multimodal_embeddings`, and the Nano VL model's
  rule for fusing rows at image-context tokens (count mismatch → ValueError, as `fuse_input_embeds`).
- `SamplingParams(**kw)`: keyword-only, recorded field names, upstream's range checks.
- Outputs expose only the recorded attribute names; `aborted()` is a method; `token_ids` are cumulative.

Generated tokens are scripted so a test can see what reached the "model": the first token is the number
of embedding rows fused, then prompt[-1] + 1, + 2, ... (stopping on end_id / stop ids / max_tokens).
"""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path
from typing import Any

from tests.upstream_contract import check_call, check_keys, fields, members, symbol

LIB = "tensorrt_llm"
NANO_MODULE = "tensorrt_llm._torch.models.modeling_nemotron_nano"
STEP_S = 0.002  # fake decode time per token
MAMBA_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")  # KvCacheConfig.mamba_ssm_cache_dtype Literal


class FakeSamplingParams:
    """tensorrt_llm.SamplingParams: keyword-only dataclass; unknown keyword → TypeError."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - fields(LIB, "tensorrt_llm.SamplingParams"))
        if unknown:
            raise TypeError(f"SamplingParams.__init__() got an unexpected keyword argument {unknown[0]!r}")
        for name in fields(LIB, "tensorrt_llm.SamplingParams"):
            setattr(self, name, None)
        self.max_tokens = 32
        self.add_special_tokens = True
        self.include_stop_str_in_output = False
        self.ignore_eos = False
        for k, v in kwargs.items():
            setattr(self, k, v)
        if self.temperature is not None and self.temperature < 0:
            raise ValueError("require temperature >= 0")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError("require 0 <= top_p <= 1")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError("require top_k >= 0")


class _Restricted:
    """An object with only the recorded attribute names."""

    _allowed: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} upstream")


class FakeCompletionOutput(_Restricted):
    def __init__(self) -> None:
        self.__dict__.update({"index": 0, "text": "", "token_ids": [], "finish_reason": None, "stop_reason": None,
                              "logprobs": None, "cumulative_logprob": None})


class FakeRequestOutput(_Restricted):
    """RequestOutput / GenerationResult: async iteration yields this same object after each token."""

    def __init__(self, prompt_token_ids: list[int], plan: list[int], finish: str) -> None:
        self.__dict__.update({"request_id": id(self), "prompt_token_ids": prompt_token_ids, "finished": False,
                              "outputs": [FakeCompletionOutput()], "_plan": plan, "_finish": finish,
                              "_aborted": False})

    def abort(self) -> None:
        self.__dict__["_aborted"] = True

    def aborted(self) -> bool:
        return self.__dict__["_aborted"]

    def __aiter__(self) -> FakeRequestOutput:
        return self

    async def __anext__(self) -> FakeRequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(STEP_S)
        out = self.outputs[0]
        if self._aborted:
            self.__dict__["finished"] = True
            out.finish_reason = "cancelled"
            return self
        out.token_ids = [*out.token_ids, self._plan[len(out.token_ids)]]  # cumulative
        if len(out.token_ids) == len(self._plan):
            self.__dict__["finished"] = True
            out.finish_reason = self._finish
        return self


class FakeBaseMultimodalInputProcessor:
    """tensorrt_llm.inputs.registry.BaseMultimodalInputProcessor: the embeddings wrapper as upstream has it."""

    supports_token_id_mm_expansion = False
    mm_bidirectional_blocks = False

    def __init__(self, model_path: Any, config: Any, tokenizer: Any, trust_remote_code: bool = True,
                 **kwargs: Any) -> None:
        self._config, self._model_path, self._tokenizer = config, model_path, tokenizer
        self._trust_remote_code = trust_remote_code

    @property
    def config(self) -> Any:
        return self._config

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def attach_multimodal_embeddings(self, inputs: Any, multimodal_embedding: Any, sampling_params: Any) -> Any:
        if (inputs.get("prompt_token_ids") is not None and inputs.get("prompt") is None
                and not self.supports_token_id_mm_expansion):
            inputs = self._detokenize_to_text_prompt(inputs, sampling_params)
        return self._attach_multimodal_embeddings_impl(inputs, multimodal_embedding, sampling_params)

    def _attach_multimodal_embeddings_impl(self, inputs: Any, multimodal_embedding: Any, sampling_params: Any) -> Any:
        raise NotImplementedError("Input processor does not support multimodal embedding input")

    def _detokenize_to_text_prompt(self, inputs: Any, sampling_params: Any) -> dict[str, Any]:
        if sampling_params is not None:
            sampling_params.add_special_tokens = False
        return {"prompt": " ".join(map(str, inputs["prompt_token_ids"])),  # the ids are gone from here on
                "multi_modal_data": inputs.get("multi_modal_data"),
                "mm_processor_kwargs": inputs.get("mm_processor_kwargs") or {}}

    def call_with_text_prompt(self, inputs: Any, sampling_params: Any) -> Any:
        raise NotImplementedError("the fake does not process raw media")

    def call_with_token_ids(self, inputs: Any, sampling_params: Any) -> Any:
        raise NotImplementedError("supports_token_id_mm_expansion is False")

    def get_mm_token_ids(self) -> Any:
        return None


class FakeNanoV2VLInputProcessor(FakeBaseMultimodalInputProcessor):
    """modeling_nemotron_nano.NanoV2VLInputProcessor: refuses to run without trust_remote_code."""

    def __init__(self, model_path: Any, config: Any, tokenizer: Any, trust_remote_code: bool = True,
                 **kwargs: Any) -> None:
        kwargs.pop("video_pruning_rate", None)
        super().__init__(model_path, config, tokenizer, trust_remote_code, **kwargs)
        if not trust_remote_code:
            raise ValueError("trust_remote_code must be True for NanoV2VL")


class FakeNemotronNanoVL:
    """Stands for the model class NemotronH_Nano_VL_V2 (registry key); `fuse` is its forward's rule."""

    @staticmethod
    def fuse(prompt_token_ids: list[int], multimodal_data: dict[str, Any] | None, img_context_token_id: int) -> Any:
        positions = sum(1 for t in prompt_token_ids if t == img_context_token_id)
        rows = (multimodal_data or {}).get("multimodal_embedding")
        if rows is None:
            if positions:
                raise ValueError("the vision encoder would run, but the request carries no pixel values")
            return None
        if positions != int(rows.shape[0]):
            raise ValueError(f"Multimodal token count mismatch: found {positions} image tokens in input_ids but "
                             f"received {int(rows.shape[0])} image embeddings.")
        return rows


class FakeLLM:
    """tensorrt_llm.LLM (PyTorch backend)."""

    instances: list[FakeLLM] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = check_call(LIB, "tensorrt_llm.LLM.__init__", args, kwargs)
        extra = bound.arguments.get("kwargs", {})
        explicit = {k: v for k, v in bound.arguments.items() if k != "kwargs"}
        check_keys(LIB, "tensorrt_llm.llmapi.llm_args.TorchLlmArgs", extra, also=("backend", "_mpi_session"))
        if isinstance(extra.get("kv_cache_config"), dict):
            kv = extra["kv_cache_config"]
            check_keys(LIB, "tensorrt_llm.llmapi.llm_args.KvCacheConfig", kv)
            if kv.get("mamba_ssm_cache_dtype", "auto") not in MAMBA_CACHE_DTYPES:
                raise ValueError(f"kv_cache_config.mamba_ssm_cache_dtype {kv['mamba_ssm_cache_dtype']!r}")
        if isinstance(extra.get("cuda_graph_config"), dict):
            cg = extra["cuda_graph_config"]
            check_keys(LIB, "tensorrt_llm.llmapi.llm_args.CudaGraphConfig", cg)
            sizes, mbs = cg.get("batch_sizes"), cg.get("max_batch_size", 0)
            if sizes and mbs and mbs != max(sizes):  # the newer tree's rule; the older one is stricter still
                raise ValueError("cuda_graph_config.max_batch_size must equal max(batch_sizes)")
        self.options = {**explicit, **extra}
        self.model = Path(str(explicit["model"]))
        trust = bool(explicit.get("trust_remote_code") or extra.get("trust_remote_code"))
        from transformers import AutoConfig  # the real loader TensorRT-LLM calls

        self.hf_config = AutoConfig.from_pretrained(str(self.model), trust_remote_code=trust)
        arch = (self.hf_config.architectures or [None])[0]
        model_cls = _MODEL_CLASSES.get(arch)
        if model_cls is None:
            raise RuntimeError(f"unregistered model architecture {arch!r}")
        processor_cls = _REGISTRY._input_processors_cls_by_model_type[model_cls]
        self.input_processor = processor_cls(str(self.model), self.hf_config, None, trust_remote_code=trust)
        gen = json.loads((self.model / "generation_config.json").read_text()) if \
            (self.model / "generation_config.json").is_file() else {}
        eos = gen.get("eos_token_id", [])
        self.end_ids = set(eos if isinstance(eos, list) else [eos])
        self.fused: list[Any] = []  # what each request's "forward" received (for the tests)
        self.shut_down = False
        FakeLLM.instances.append(self)

    def generate_async(self, *args: Any, **kwargs: Any) -> FakeRequestOutput:
        bound = check_call(LIB, "tensorrt_llm.LLM.generate_async", args, kwargs)
        inputs, sp = bound.arguments["inputs"], bound.arguments.get("sampling_params") or FakeSamplingParams()
        if not isinstance(inputs, dict):
            raise TypeError("the fake takes dict prompts only")
        unknown = sorted(set(inputs) - members(LIB, "tensorrt_llm.llmapi.llm.BaseLLM._preprocess"))
        if unknown:
            raise TypeError(f"prompt key {unknown[0]!r} is not read by upstream's LLM._preprocess")
        ids = inputs.get("prompt_token_ids")
        extra = None
        if ids is not None and inputs.get("multi_modal_data") is None and inputs.get("multi_modal_embeddings") is None:
            pass
        elif "prompt" in inputs or ids is not None:
            if "multi_modal_embeddings" in inputs:
                ids, extra = self.input_processor.attach_multimodal_embeddings(
                    inputs, inputs["multi_modal_embeddings"], sp)
                if self.input_processor.get_mm_token_ids() is None:
                    raise ValueError("cannot locate the multimodal tokens (no mm_token_ids) for chunked prefill")
            else:
                raise NotImplementedError("the fake serves token-id prompts only")
        else:
            raise TypeError("The inputs must be type str or list of int")
        rows = FakeNemotronNanoVL.fuse(list(ids), (extra or {}).get("multimodal_data"),
                                       int(self.hf_config.img_context_token_id))
        self.fused.append(rows)
        return FakeRequestOutput(list(ids), *self._plan(list(ids), rows, sp))

    def _plan(self, ids: list[int], rows: Any, sp: FakeSamplingParams) -> tuple[list[int], str]:
        tokens, stop = [], set(sp.stop_token_ids or [])
        for k in range(int(sp.max_tokens)):
            tok = (int(rows.shape[0]) if rows is not None else 0) if k == 0 else ids[-1] + k
            if tok in stop:
                return tokens + ([tok] if sp.include_stop_str_in_output else []), "stop"
            if tok in self.end_ids and not sp.ignore_eos:
                return tokens, "stop"
            tokens.append(tok)
        return tokens, "length"

    def shutdown(self) -> None:
        self.shut_down = True


class _InputProcessorRegistry:
    def __init__(self) -> None:
        self._input_processors_cls_by_model_type: dict[type, type] = {}


class _PlaceholderRegistry:
    def __init__(self) -> None:
        self._by_model_type: dict[str, Any] = {}

    def set_placeholder_metadata(self, model_type: str, placeholder_metadata: Any, registrant_module: Any = None) -> None:
        self._by_model_type[model_type] = placeholder_metadata

    def get_placeholder_metadata(self, model_type: str) -> Any:
        if model_type not in self._by_model_type:
            raise ValueError(f"Model type {model_type} is not registered in MultimodalPlaceholderRegistry")
        return self._by_model_type[model_type]


_REGISTRY = _InputProcessorRegistry()
_PLACEHOLDERS = _PlaceholderRegistry()
_MODEL_CLASSES: dict[str, type] = {}


def register_input_processor(*args: Any, **kwargs: Any) -> Any:
    bound = check_call(LIB, "tensorrt_llm.inputs.register_input_processor", args, kwargs)
    processor_cls, model_type = bound.arguments["processor_cls"], bound.arguments["model_type"]
    metadata = bound.arguments.get("placeholder_metadata")

    def wrapper(model_cls: type) -> type:
        _REGISTRY._input_processors_cls_by_model_type[model_cls] = processor_cls
        if metadata is None:
            raise ValueError("A valid placeholder_metadata must be provided")
        _PLACEHOLDERS.set_placeholder_metadata(model_type, metadata, registrant_module=model_cls.__module__)
        processor_cls._registered_model_type = model_type
        return model_cls

    return wrapper


def install(monkeypatch: Any) -> types.ModuleType:
    """Put the fake package into sys.modules (undone by monkeypatch); returns the top module. The built-in
    Nano VL registration is made fresh, as importing upstream's modeling module does."""
    _REGISTRY._input_processors_cls_by_model_type.clear()
    _PLACEHOLDERS._by_model_type.clear()
    FakeLLM.instances.clear()
    symbol(LIB, "tensorrt_llm._torch.models.modeling_nemotron_nano")  # the data must be there
    root = types.ModuleType("tensorrt_llm")
    root.__doc__ = "FAKE tensorrt_llm (tests/fake_tensorrt_llm.py)"
    root.LLM, root.SamplingParams, root.__version__ = FakeLLM, FakeSamplingParams, "fake"
    inputs_mod, registry_mod = types.ModuleType("tensorrt_llm.inputs"), types.ModuleType("tensorrt_llm.inputs.registry")
    inputs_mod.register_input_processor = registry_mod.register_input_processor = register_input_processor
    registry_mod.MULTIMODAL_PLACEHOLDER_REGISTRY = _PLACEHOLDERS
    registry_mod.INPUT_PROCESSOR_REGISTRY = _REGISTRY
    registry_mod.BaseMultimodalInputProcessor = FakeBaseMultimodalInputProcessor
    nano = types.ModuleType(NANO_MODULE)
    model_cls = type("NemotronH_Nano_VL_V2", (FakeNemotronNanoVL,), {"__module__": NANO_MODULE})
    nano.NanoV2VLInputProcessor, nano.NemotronH_Nano_VL_V2 = FakeNanoV2VLInputProcessor, model_cls
    _MODEL_CLASSES["NemotronH_Nano_VL_V2"] = model_cls
    register_input_processor(FakeNanoV2VLInputProcessor, model_type="NemotronH_Nano_VL_V2",
                             placeholder_metadata={"image": "<image>", "video": "<video>"})(model_cls)
    for name, mod in {"tensorrt_llm": root, "tensorrt_llm.inputs": inputs_mod,
                      "tensorrt_llm.inputs.registry": registry_mod,
                      "tensorrt_llm._torch": types.ModuleType("tensorrt_llm._torch"),
                      "tensorrt_llm._torch.models": types.ModuleType("tensorrt_llm._torch.models"),
                      NANO_MODULE: nano}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    root.inputs = inputs_mod
    return root
