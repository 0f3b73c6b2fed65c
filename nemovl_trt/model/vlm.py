"""NemotronVLM: vision encoder + Nemotron-H LM, with state-dict names equal to the checkpoint's
(`vision_model.*`, `mlp1.*`, `language_model.*`), so `load_state_dict(ckpt.tensors, strict=True)` works."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nemovl_trt.checkpoint.config import VLMConfig
from nemovl_trt.model.nemotron_h import NemotronHLM
from nemovl_trt.model.vision import VisionEncoder

# Above this many checkpoint elements, from_checkpoint builds the module on the meta device (no
# allocation / random init). A speed/memory switch only; the result is identical either way.
META_INIT_ABOVE_PARAMS = 50_000_000

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'float32' / 'bfloat16' / 'float16' / torch dtype / None → torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported (choose from {', '.join(_DTYPES)}).")
    return _DTYPES[dtype]


def with_optional_defaults(cfg: VLMConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the tensors a checkpoint may omit (RADIO's unused input-conditioner / summary buffers, and
    lm_head when embeddings are tied) so a strict load succeeds. Returns a new dict."""
    out = dict(tensors)
    pre = "vision_model.radio_model."
    out.setdefault(pre + "input_conditioner.norm_mean", torch.tensor(cfg.norm_mean).view(-1, 1, 1))
    out.setdefault(pre + "input_conditioner.norm_std", torch.tensor(cfg.norm_std).view(-1, 1, 1))
    out.setdefault(pre + "summary_idxs", torch.arange(cfg.vision.num_cls_tokens, dtype=torch.int64))
    if cfg.llm.tie_word_embeddings and "language_model.lm_head.weight" not in out:
        out["language_model.lm_head.weight"] = out["language_model.backbone.embeddings.weight"]
    return out


class NemotronVLM(nn.Module):
    """The whole model. `.vision` is the VisionEncoder (its `vision_model`/`mlp1` are registered
    directly on this module, so names match the checkpoint); `.language_model` the NemotronHLM."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        enc = VisionEncoder(cfg)
        self.vision_model = enc.vision_model
        self.mlp1 = enc.mlp1
        object.__setattr__(self, "_vision", enc)  # shares the modules above; not a second registration
        self.language_model = NemotronHLM(cfg.llm)

    @property
    def vision(self) -> VisionEncoder:
        return self._vision

    @classmethod
    def from_checkpoint(cls, ckpt: Any, dtype: str | torch.dtype | None = None) -> NemotronVLM:
        """Build from a `nemovl_trt.checkpoint.loader.Checkpoint` (fields `.config`, `.tensors`).

        Parameters are created on the meta device and assigned from the checkpoint tensors (strict:
        every name must match, none may be missing or extra). `dtype` casts the whole model
        (e.g. "float32" for the fp32 reference of a bf16 checkpoint); None keeps the stored dtypes.
        Recurrent states and softmaxes stay fp32 regardless.
        """
        tensors = {k: (v() if callable(v) else v) for k, v in dict(ckpt.tensors).items()}
        numel = sum(t.numel() for t in tensors.values())
        if numel > META_INIT_ABOVE_PARAMS:  # skip allocating + initialising weights that are replaced anyway
            with torch.device("meta"):
                model = cls(ckpt.config)
        else:  # small: plain construction is faster than the meta-device machinery's first use
            model = cls(ckpt.config)
        model.load_state_dict(with_optional_defaults(ckpt.config, tensors), strict=True, assign=True)
        target = parse_dtype(dtype)
        if target is not None:
            model.to(target)
        return model.eval()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N,3,S,S] normalised → [N, tokens_per_tile, llm_hidden] in the LLM dtype."""
        dtype = self.mlp1[1].weight.dtype
        return self.vision(pixels.to(dtype)).to(self.language_model.dtype)

    def embed(self, input_ids: torch.Tensor | list[int], mm_embeddings: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the rows whose id == img_context_token_id replaced, in order, by the
        rows of `mm_embeddings`.

        input_ids [L] (or a list) → [L, D]; mm_embeddings [M, D] or [N, P, D] (flattened to N·P rows)
        or None. Raises ValueError when the number of placeholders differs from the number of rows.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.int64, device=self.language_model.lm_head.weight.device)
        if ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D, got shape {list(ids.shape)}.")
        emb = self.language_model.embed_tokens(ids)  # [L,D]
        slots = ids == self.cfg.img_context_token_id
        n_slots = int(slots.sum())
        if mm_embeddings is None:
            if n_slots:
                raise ValueError(f"the prompt has {n_slots} image-context tokens but no image embeddings "
                                 f"were given.")
            return emb
        rows = mm_embeddings.reshape(-1, mm_embeddings.shape[-1])
        if rows.shape[-1] != emb.shape[-1]:
            raise ValueError(f"image embeddings have width {rows.shape[-1]}, the LLM hidden size is "
                             f"{emb.shape[-1]}.")
        if rows.shape[0] != n_slots:
            raise ValueError(f"the prompt has {n_slots} image-context tokens but {rows.shape[0]} image "
                             f"embedding rows were given.")
        emb = emb.clone()
        emb[slots] = rows.to(emb.dtype)
        return emb
