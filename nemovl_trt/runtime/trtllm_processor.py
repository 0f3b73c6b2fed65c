"""Our input processor for TensorRT-LLM's Nemotron Nano VL model: it takes precomputed vision embeddings.

TensorRT-LLM's own `NanoV2VLInputProcessor` wants raw media and runs RADIO + mlp1 itself; its base class
offers a hook for externally computed embeddings (`_attach_multimodal_embeddings_impl`, reached through
`LLM.generate_async(inputs={"prompt_token_ids": ..., "multi_modal_embeddings": {...}})`), which the Nano
processor does not implement. `install_embeddings_processor` subclasses the upstream processor with that
hook and registers the subclass for the upstream model class through TensorRT-LLM's public registration
API (`tensorrt_llm.inputs.register_input_processor`), without editing TensorRT-LLM. The model side is
unchanged: its forward skips the vision encoder for a request whose `multimodal_data` already holds
`multimodal_embedding`, and fuses the rows at the image-context token positions (docs/trtllm.md §3).

`attach_embeddings` is the pure core (torch only), tested on CPU; the subclass is only made where
tensorrt_llm is importable (a GPU host), or from the enforcing fake in the tests.
"""

from __future__ import annotations

import importlib
from typing import Any

from nemovl_trt.runtime.trtllm_requests import EMBEDDINGS_MODALITY, count_image_context

MODEL_TYPE = "NemotronH_Nano_VL_V2"  # config.json model_type / architectures[0] of the checkpoint
UPSTREAM_MODEL_MODULE = "tensorrt_llm._torch.models.modeling_nemotron_nano"
UPSTREAM_PROCESSOR_CLASS = "NanoV2VLInputProcessor"
UPSTREAM_MODEL_CLASS = "NemotronH_Nano_VL_V2"
EMBEDDING_KEY = "multimodal_embedding"  # multimodal_data key the model's forward reads instead of encoding
# What our subclass relies on in upstream's processor base class (TensorRT-LLM after PR #14370, 2026-05;
# 1.2.0rc2 decoded token ids to text in llm.py and dropped multi_modal_embeddings).
REQUIRED_BASE_MEMBERS = ("supports_token_id_mm_expansion", "attach_multimodal_embeddings",
                         "_attach_multimodal_embeddings_impl", "_detokenize_to_text_prompt", "call_with_text_prompt")


def attach_embeddings(prompt_token_ids: list[int], multimodal_embedding: Any, img_context_token_id: int,
                      hidden_size: int, dtype: Any) -> tuple[list[int], dict[str, Any]]:
    """Check our precomputed rows against the prompt and package them the way the model reads them.

    prompt_token_ids: the final prompt (image-context tokens expanded, EVS applied), kept as is.
    multimodal_embedding: {"image": [tensor [m_i, hidden], ...]}; the rows of all tensors, in order, go to
    the image-context tokens in prompt order. Returns (ids, {"multimodal_data": {"multimodal_embedding":
    tensor [M, hidden] in `dtype`}}). Raises ValueError (one sentence) when anything does not fit."""
    import torch

    if not isinstance(multimodal_embedding, dict):
        raise ValueError("multi_modal_embeddings must be a dict keyed by modality, e.g. "
                         f"{{'{EMBEDDINGS_MODALITY}': [tensor]}}; got {type(multimodal_embedding).__name__}.")
    unknown = sorted(set(multimodal_embedding) - {EMBEDDINGS_MODALITY})
    if unknown:
        raise ValueError(f"multi_modal_embeddings has modality {unknown[0]!r}; nemovl sends every vision row "
                         f"(images and EVS-pruned video) under {EMBEDDINGS_MODALITY!r}.")
    parts = multimodal_embedding.get(EMBEDDINGS_MODALITY) or []
    if isinstance(parts, torch.Tensor):
        parts = [parts]
    if not parts or any(not isinstance(p, torch.Tensor) or p.ndim != 2 for p in parts):
        raise ValueError("multi_modal_embeddings['image'] must be a non-empty list of [rows, hidden] tensors.")
    rows = torch.cat(list(parts), dim=0) if len(parts) > 1 else parts[0]
    if int(rows.shape[1]) != hidden_size:
        raise ValueError(f"vision embeddings have hidden size {int(rows.shape[1])}; the LLM expects {hidden_size}.")
    expected = count_image_context(prompt_token_ids, img_context_token_id)
    if int(rows.shape[0]) != expected:
        raise ValueError(f"the prompt has {expected} image-context tokens (id {img_context_token_id}) but "
                         f"{int(rows.shape[0])} vision embedding rows were given.")
    return list(prompt_token_ids), {"multimodal_data": {EMBEDDING_KEY: rows.to(dtype).contiguous()}}


def _llm_hidden_size(config: Any) -> int:
    llm = getattr(config, "llm_config", None)
    size = getattr(llm, "hidden_size", None) if llm is not None else None
    if size is None:
        raise ValueError("the bundle's config has no llm_config.hidden_size.")
    return int(size)


def _model_dtype(config: Any) -> Any:
    import torch

    name = getattr(config, "torch_dtype", None) or getattr(getattr(config, "llm_config", None), "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name or "bfloat16").replace("torch.", ""))


def make_embeddings_processor(base: type) -> type:
    """Subclass of TensorRT-LLM's Nano VL input processor `base` that accepts our embeddings."""
    import torch

    class NemovlEmbeddingsInputProcessor(base):  # type: ignore[misc, valid-type]
        """Upstream's Nano VL processor, plus precomputed embeddings from nemovl's vision plan."""

        # Our prompt ids are final (placeholders expanded by our preprocessor): the base class must pass
        # them through instead of decoding them to text and re-tokenising.
        supports_token_id_mm_expansion = True

        def call_with_token_ids(self, inputs: Any, sampling_params: Any) -> Any:
            # Raw media with token ids (not what nemovl sends): upstream's behaviour for its own processor,
            # which decodes the ids to text and runs the text path.
            text_inputs = self._detokenize_to_text_prompt(inputs, sampling_params)
            return self.call_with_text_prompt(text_inputs, sampling_params)

        def _hf_config(self) -> Any:
            # `config` in current upstream (BaseMultimodalInputProcessor), `model_config` in older Nano code
            return getattr(self, "_config", None) or getattr(self, "model_config", None) or self.config

        def get_mm_token_ids(self) -> Any:
            return torch.tensor([int(self._hf_config().img_context_token_id)], dtype=torch.int32)

        def _attach_multimodal_embeddings_impl(self, inputs: Any, multimodal_embedding: Any,
                                               sampling_params: Any) -> Any:
            ids = inputs.get("prompt_token_ids")
            if ids is None:
                raise ValueError("nemovl sends precomputed embeddings with prompt_token_ids, not a text prompt.")
            cfg = self._hf_config()
            return attach_embeddings(list(ids), multimodal_embedding, int(cfg.img_context_token_id),
                                     _llm_hidden_size(cfg), _model_dtype(cfg))

    return NemovlEmbeddingsInputProcessor


def install_embeddings_processor() -> type:
    """Register our processor for TensorRT-LLM's Nano VL model class (in this process, before `LLM(...)` is
    built: `LLM` creates its input processor from the registry). Returns the registered class."""
    from tensorrt_llm.inputs import register_input_processor  # type: ignore[import-not-found]
    from tensorrt_llm.inputs.registry import MULTIMODAL_PLACEHOLDER_REGISTRY  # type: ignore[import-not-found]

    nano = importlib.import_module(UPSTREAM_MODEL_MODULE)
    base = getattr(nano, UPSTREAM_PROCESSOR_CLASS)
    missing = [n for n in REQUIRED_BASE_MEMBERS if not hasattr(base, n)]
    if missing:
        raise RuntimeError(f"this TensorRT-LLM cannot take precomputed vision embeddings for {MODEL_TYPE}: its "
                           f"{UPSTREAM_PROCESSOR_CLASS} lacks {', '.join(missing)} (a TensorRT-LLM from after "
                           "2026-05, with BaseMultimodalInputProcessor.supports_token_id_mm_expansion, is needed).")
    processor = make_embeddings_processor(base)
    placeholders = MULTIMODAL_PLACEHOLDER_REGISTRY.get_placeholder_metadata(MODEL_TYPE)
    register_input_processor(processor, model_type=MODEL_TYPE,
                             placeholder_metadata=placeholders)(getattr(nano, UPSTREAM_MODEL_CLASS))
    return processor
