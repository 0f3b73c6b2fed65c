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
- `SamplingParams(**kw)`: keyword-only, recorded field names, upstream's range checks, best_of = best_of or
  n, best_of >= n, no best_of > 1 under greedy decoding, logprobs on only when bool(logprobs) (b35ac1b6).
- Outputs expose only the recorded attribute names (a field missing from the data is missing here);
  `aborted()` is a method; `token_ids` / `logprobs` are cumulative per output.
- n / best_of as GenerationResultBase (a678b91a) has them: best_of sequences, each streamed response
  updates ONE sequence (round robin here), `finish_reason` is set only on the response that finishes the
  request (`_handle_sequence` checks `self._done`), so sequences that ended earlier keep None; with
  best_of > n `outputs` sorts by cumulative_logprob and re-indexes on every access.
- logprobs: TokenLogprobs, one dict[int, Logprob] per token: the top-K by rank plus the sampled token
  (rank > K) when it is not among them; cumulative_logprob only when logprobs are on. prompt_logprobs:
  one dict per prompt position (position t predicts token t + 1), top-K only (compute_logprobs, tokens=None).

Generated tokens are scripted so a test can see what reached the "model": the first token is the number
of embedding rows fused, then prompt[-1] + 1, + 2, ... (stopping on end_id / stop ids / max_tokens);
sequence j adds SEQ_OFFSET * j to every token after the first. Logprobs are scripted too (`fake_logprob`).
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
SEQ_OFFSET = 100  # token offset of sequence j (so choices differ)
ALT_BASE = 900  # ids of the scripted alternative tokens
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
        self.n = 1 if self.n is None else self.n
        self.best_of = self.best_of or self.n
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        greedy = (self.temperature is None and self.top_p is None and self.top_k is None) or self.top_k == 1 \
            or self.top_p == 0.0 or self.temperature == 0
        if self.best_of > 1 and greedy and not self.use_beam_search:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")
        if self.seed is not None and not 0 <= int(self.seed) < 2 ** 64:
            raise TypeError("incompatible function arguments: seed must fit RandomSeedType (uint64)")
        self.logprobs = self.logprobs and int(self.logprobs)
        self.prompt_logprobs = self.prompt_logprobs and int(self.prompt_logprobs)


class FakeGuidedDecodingParams:
    """tensorrt_llm.sampling_params.GuidedDecodingParams: keyword-only recorded fields, at most one truthy
    (upstream's _validate)."""

    def __init__(self, **kwargs: Any) -> None:
        known = fields(LIB, "tensorrt_llm.sampling_params.GuidedDecodingParams")
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"GuidedDecodingParams.__init__() got an unexpected keyword argument {unknown[0]!r}")
        if sum(bool(v) for v in kwargs.values()) > 1:
            raise ValueError("Only one guide can be used for a request")
        for name in known:
            setattr(self, name, kwargs.get(name, False if name == "json_object" else None))
        self.kwargs = kwargs


def compile_like_llguidance_backend(guide: FakeGuidedDecodingParams, tokenizer_json: str, vocab: int) -> Any:
    """What upstream's LLGuidanceMatcherFactory.create does with a guide (0fccc5b9), with the real
    llguidance: json_object / json → grammar_from_json_schema, regex → grammar_from_regex, grammar →
    grammar_from_lark; a matcher error is a ValueError."""
    import llguidance

    if guide.json_object:
        grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
    elif guide.json is not None:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            guide.json if isinstance(guide.json, str) else json.dumps(guide.json))
    elif guide.regex is not None:
        grammar = llguidance.LLMatcher.grammar_from_regex(guide.regex)
    elif guide.grammar is not None:
        grammar = llguidance.LLMatcher.grammar_from_lark(guide.grammar)
    else:
        raise ValueError("Unsupported guide type: structural_tag (xgrammar only)")
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab), grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"LLGuidance matcher error: {matcher.get_error()}")
    return matcher


class _Restricted:
    """An object with only the recorded attribute names."""

    _allowed: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} upstream")


class FakeLogprob:
    """tensorrt_llm.executor.result.Logprob: a slots dataclass of the recorded fields (logprob, rank)."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - fields(LIB, "tensorrt_llm.executor.result.Logprob"))
        if unknown:
            raise TypeError(f"Logprob got an unexpected keyword argument {unknown[0]!r}")
        for name in fields(LIB, "tensorrt_llm.executor.result.Logprob"):
            setattr(self, name, kwargs.get(name))


def fake_logprob(seq: int, position: int, best_of: int) -> float:
    """The scripted logprob of sequence `seq`'s token at `position`: the later sequences are the likelier
    ones, so ranking by cumulative logprob reverses the order."""
    return -0.5 - 0.01 * position - 0.1 * (best_of - 1 - seq)


def fake_position(token: int, lp: float, position: int, k: int) -> dict[int, FakeLogprob]:
    """One scripted TokenLogprobs position for logprobs=k: at even positions the sampled token is the best
    (rank 1) and k - 1 alternatives (ALT_BASE + r) follow, 0.1 apart; at odd positions k alternatives are
    better than it and it comes last with rank k + 1, as upstream adds a sampled token outside the top-K."""
    if position % 2 == 0:
        out = {token: FakeLogprob(logprob=lp, rank=1)}
        out.update({ALT_BASE + r: FakeLogprob(logprob=lp - 0.1 * (r + 1), rank=r + 2) for r in range(k - 1)})
        return out
    out = {ALT_BASE + r: FakeLogprob(logprob=lp + 0.1 * (k - r), rank=r + 1) for r in range(k)}
    out[token] = FakeLogprob(logprob=lp, rank=k + 1)
    return out


class FakeCompletionOutput(_Restricted):
    """tensorrt_llm.executor.result.CompletionOutput: only the recorded fields exist."""

    def __init__(self, index: int) -> None:
        defaults = {"index": index, "text": "", "token_ids": [], "finish_reason": None, "stop_reason": None,
                    "logprobs": [], "prompt_logprobs": [], "cumulative_logprob": None}
        for name in fields(LIB, "tensorrt_llm.executor.result.CompletionOutput"):
            self.__dict__[name] = defaults.get(name)

    def _set(self, name: str, value: Any) -> None:
        if name in fields(LIB, "tensorrt_llm.executor.result.CompletionOutput"):
            self.__dict__[name] = value


class FakeRequestOutput(_Restricted):
    """RequestOutput / GenerationResult: async iteration yields this same object after each response."""

    def __init__(self, prompt_token_ids: list[int], plans: list[tuple[list[int], str]], sp: Any) -> None:
        self.__dict__.update({"request_id": id(self), "prompt_token_ids": prompt_token_ids, "finished": False,
                              "_outputs": [FakeCompletionOutput(j) for j in range(len(plans))], "_plans": plans,
                              "_sp": sp, "_aborted": False, "_turn": 0, "_responses": 0})

    @property
    def outputs(self) -> list[FakeCompletionOutput]:
        sp, outs = self._sp, self._outputs
        if sp.use_beam_search or sp.n == sp.best_of:
            return outs[:sp.n]
        ranked = sorted(outs, key=lambda o: o.cumulative_logprob if o.cumulative_logprob is not None
                        else float("-inf"), reverse=True)
        for i, o in enumerate(ranked):
            o.__dict__["index"] = i  # re-indexed on every access, as upstream
        return ranked[:sp.n]

    def abort(self) -> None:
        self.__dict__["_aborted"] = True

    def aborted(self) -> bool:
        return self.__dict__["_aborted"]

    def __aiter__(self) -> FakeRequestOutput:
        return self

    def _pending(self) -> list[int]:
        return [j for j, (plan, _) in enumerate(self._plans) if len(self._outputs[j].token_ids) < len(plan)]

    async def __anext__(self) -> FakeRequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(STEP_S)
        if self._aborted:
            self.__dict__["finished"] = True
            for out in self._outputs:
                out._set("finish_reason", "cancelled")
            return self
        pending = self._pending()
        if self._responses == 0 and self._sp.prompt_logprobs:  # the first response carries them
            for out in self._outputs:
                out._set("prompt_logprobs", self._prompt_logprobs())
        self.__dict__["_responses"] += 1
        if not pending:  # nothing to generate (max_tokens reached at once)
            self.__dict__["finished"] = True
            for j, out in enumerate(self._outputs):
                out._set("finish_reason", self._plans[j][1])
            return self
        j = pending[self._turn % len(pending)]
        self.__dict__["_turn"] += 1
        out, (plan, reason) = self._outputs[j], self._plans[j]
        pos = len(out.token_ids)
        out._set("token_ids", [*out.token_ids, plan[pos]])  # cumulative
        if self._sp.logprobs:
            lp = fake_logprob(j, pos, len(self._plans))
            out._set("logprobs", [*out.logprobs, fake_position(plan[pos], lp, pos, int(self._sp.logprobs))])
            out._set("cumulative_logprob", (out.cumulative_logprob or 0.0) + lp)
        if not self._pending():  # the response that finishes the request: only its sequence gets a reason
            self.__dict__["finished"] = True
            out._set("finish_reason", reason)
        return self

    def _prompt_logprobs(self) -> list[dict[int, FakeLogprob]]:
        ids, k = self.prompt_token_ids, int(self._sp.prompt_logprobs)
        out = []
        for t in range(len(ids)):  # position t predicts token t + 1 (the last one the first output token)
            nxt = ids[t + 1] if t + 1 < len(ids) else ALT_BASE
            out.append({nxt: FakeLogprob(logprob=-0.25 * (t + 1), rank=1),
                        **{ALT_BASE + r: FakeLogprob(logprob=-0.25 * (t + 1) - 1.0 - r, rank=r + 2)
                           for r in range(k - 1)}})
        return out


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
        self.params: list[FakeSamplingParams] = []  # each request's SamplingParams
        self.matchers: list[Any] = []  # llguidance matchers compiled for guided requests
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
        if sp.guided_decoding is not None:
            backend = self.options.get("guided_decoding_backend")
            if backend is None:
                raise ValueError("guided decoding needs the LLM's guided_decoding_backend")
            if backend == "llguidance":
                self.matchers.append(compile_like_llguidance_backend(
                    sp.guided_decoding, (self.model / "tokenizer.json").read_text(encoding="utf-8"),
                    int(self.hf_config.llm_config.vocab_size)))
        self.fused.append(rows)
        self.params.append(sp)
        plans = [self._plan(list(ids), rows, sp, j) for j in range(int(sp.best_of))]
        return FakeRequestOutput(list(ids), plans, sp)

    def _plan(self, ids: list[int], rows: Any, sp: FakeSamplingParams, seq: int = 0) -> tuple[list[int], str]:
        tokens, stop = [], set(sp.stop_token_ids or [])
        for k in range(int(sp.max_tokens)):
            tok = (int(rows.shape[0]) if rows is not None else 0) if k == 0 else ids[-1] + k + SEQ_OFFSET * seq
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
    sampling_mod = types.ModuleType("tensorrt_llm.sampling_params")
    sampling_mod.SamplingParams, sampling_mod.GuidedDecodingParams = FakeSamplingParams, FakeGuidedDecodingParams
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
                      "tensorrt_llm.sampling_params": sampling_mod,
                      "tensorrt_llm.inputs.registry": registry_mod,
                      "tensorrt_llm._torch": types.ModuleType("tensorrt_llm._torch"),
                      "tensorrt_llm._torch.models": types.ModuleType("tensorrt_llm._torch.models"),
                      NANO_MODULE: nano}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    root.inputs, root.sampling_params = inputs_mod, sampling_mod
    return root
