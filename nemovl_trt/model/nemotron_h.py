"""Nemotron-H hybrid Mamba2 / attention / MLP language model (docs/model.md §6), PyTorch reference.

Layer ℓ (type from `hybrid_override_pattern`): h = h + Mixer_ℓ(RMSNorm_ℓ(h)); then norm_f, lm_head.
  M → Mamba2Mixer (mamba2.py), * → Attention (GQA, KV cache, NO positional encoding), - → relu² MLP.

State-dict names equal the checkpoint's `language_model.*` minus that prefix:
`backbone.embeddings.weight`, `backbone.layers.{l}.norm.weight`, `backbone.layers.{l}.mixer.*`,
`backbone.norm_f.weight`, `lm_head.weight`.

Shape notation: B batch, L new tokens, P cached tokens, H hidden, nq/nkv heads, d head_dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nemovl_trt.checkpoint.config import LLMConfig
from nemovl_trt.model.mamba2 import Mamba2Mixer, MambaState
from nemovl_trt.model.norms import RMSNorm


@dataclass
class KVCache:
    """Per-sequence cache of one attention layer: k, v [nkv, P, d] in the model dtype."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[1]


@dataclass
class SequenceState:
    """Everything one sequence carries between calls: Mamba2 states and KV caches by layer index."""

    mamba: dict[int, MambaState] = field(default_factory=dict)
    kv: dict[int, KVCache] = field(default_factory=dict)
    num_tokens: int = 0  # tokens already consumed


class Attention(nn.Module):
    """Causal GQA self-attention with no positional encoding (NoPE); softmax in fp32."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.nq = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads
        self.d = cfg.head_dim
        self.scale = self.d ** -0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nq * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.nq * self.d, cfg.hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """hidden [B,L,H], one cache per row (appended in place; rows may have different lengths P_b)
        → [B,L,H]. Keys are laid out [past_b, padding up to max P, new L]; the mask hides padding and
        the future."""
        b, seq, _ = hidden.shape
        q = self.q_proj(hidden).view(b, seq, self.nq, self.d).transpose(1, 2)  # [B,nq,L,d]
        k = self.k_proj(hidden).view(b, seq, self.nkv, self.d).transpose(1, 2)  # [B,nkv,L,d]
        v = self.v_proj(hidden).view(b, seq, self.nkv, self.d).transpose(1, 2)  # [B,nkv,L,d]

        past = [c.length for c in caches]
        pmax = max(past)
        if pmax:
            k_past = hidden.new_zeros(b, self.nkv, pmax, self.d)
            v_past = hidden.new_zeros(b, self.nkv, pmax, self.d)
            for i, c in enumerate(caches):
                k_past[i, :, :c.length] = c.k
                v_past[i, :, :c.length] = c.v
            k_all = torch.cat([k_past, k], dim=2)  # [B,nkv,P+L,d]
            v_all = torch.cat([v_past, v], dim=2)
        else:
            k_all, v_all = k, v
        for i, c in enumerate(caches):
            c.k = torch.cat([c.k, k[i]], dim=1)
            c.v = torch.cat([c.v, v[i]], dim=1)

        # mask [B,1,L,P+L]: past key j valid iff j < P_b; new key m visible to query l iff m ≤ l
        past_ok = torch.arange(pmax, device=hidden.device)[None, :] < torch.tensor(past, device=hidden.device)[:, None]
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=hidden.device))
        mask = torch.cat([past_ok[:, None, :].expand(b, seq, pmax), causal[None].expand(b, seq, seq)], dim=-1)

        # GQA: query head h uses kv head h // rep, so group the query heads as [nkv, rep]
        rep = self.nq // self.nkv
        qg = q.view(b, self.nkv, rep, seq, self.d)  # [B,nkv,rep,L,d]
        scores = torch.matmul(qg, k_all[:, :, None].transpose(-1, -2)) * self.scale  # [B,nkv,rep,L,P+L]
        scores = scores.masked_fill(~mask[:, None, None], -math.inf)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v_all[:, :, None]).view(b, self.nq, seq, self.d)  # [B,nq,L,d]
        return self.o_proj(out.transpose(1, 2).reshape(b, seq, self.nq * self.d))


class MLP(nn.Module):
    """down(relu(up(x))²): no gate, no bias (mlp_bias from the config)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.mlp_hidden_act != "relu2":
            raise ValueError(f"mlp_hidden_act '{cfg.mlp_hidden_act}' is not supported (only relu2).")
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,L,H] → [B,L,H]."""
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    """One residual block: h + mixer(norm(h))."""

    def __init__(self, cfg: LLMConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        if layer_type == "mamba":
            self.mixer: nn.Module = Mamba2Mixer(cfg)
        elif layer_type == "attention":
            self.mixer = Attention(cfg)
        else:
            self.mixer = MLP(cfg)


class Backbone(nn.Module):
    """`backbone.*`: embeddings, layers, norm_f."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, t) for t in cfg.layer_types])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class NemotronHLM(nn.Module):
    """Nemotron-H causal LM (`language_model.*` of the checkpoint, prefix removed)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [..., L] int64 → [..., L, H]."""
        return self.backbone.embeddings(input_ids)

    def new_state(self) -> SequenceState:
        """An empty cache for one sequence: zero Mamba states (fp32), empty KV caches."""
        st = SequenceState()
        dev = self.lm_head.weight.device
        for i, layer in enumerate(self.backbone.layers):
            if layer.layer_type == "mamba":
                st.mamba[i] = layer.mixer.new_state(dev)
            elif layer.layer_type == "attention":
                mix = layer.mixer
                empty = torch.zeros(mix.nkv, 0, mix.d, dtype=self.dtype, device=dev)
                st.kv[i] = KVCache(k=empty, v=empty.clone())
        return st

    def hidden_states(self, embeds: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
        """Run L new positions for B sequences, continuing from (and updating) their states.

        embeds [B,L,H] (model dtype), len(states) == B → final-normed hidden states [B,L,H] (what
        `lm_head` reads). L > 1: prefill (chunked scan); L == 1: decode (recurrence); sequences may
        have consumed different numbers of tokens before.
        """
        if embeds.shape[0] != len(states):
            raise ValueError(f"got {embeds.shape[0]} rows but {len(states)} sequence states.")
        h = embeds.to(self.dtype)
        for i, layer in enumerate(self.backbone.layers):
            x = layer.norm(h)
            if layer.layer_type == "mamba":
                x = layer.mixer(x, [s.mamba[i] for s in states])
            elif layer.layer_type == "attention":
                x = layer.mixer(x, [s.kv[i] for s in states])
            else:
                x = layer.mixer(x)
            h = h + x
        for s in states:
            s.num_tokens += embeds.shape[1]
        return self.backbone.norm_f(h)

    def forward_embeds(self, embeds: torch.Tensor, states: list[SequenceState],
                       last_only: bool = False) -> torch.Tensor:
        """`hidden_states` followed by the head: embeds [B,L,H] → logits [B,L,V] (fp32), or [B,V] with
        `last_only`."""
        h = self.hidden_states(embeds, states)
        if last_only:
            h = h[:, -1]
        return self.lm_head(h).float()

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Uncached full forward: input_ids [B,L] or inputs_embeds [B,L,H] → logits [B,L,V] fp32."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.forward_embeds(embeds, [self.new_state() for _ in range(embeds.shape[0])])
