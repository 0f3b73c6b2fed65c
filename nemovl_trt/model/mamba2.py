"""Mamba2 mixer of Nemotron-H (docs/model.md §6.2): chunked SSD scan for prefill, one-step recurrence
for decode, per-sequence conv state + SSM state kept in fp32.

Notation used in the shape comments:
  B batch, L new tokens, H hidden_size, nh mamba heads, hd mamba head dim, ng groups, N ssm state size,
  Cd conv channels (= nh·hd + 2·ng·N), K conv kernel, Q chunk size, nc number of chunks.

The recurrence for head h (the decode formula, also what the chunked scan computes):
  S_t = exp(dt_t·A_h)·S_{t-1} + dt_t · x_t ⊗ B_t      S: [hd, N]
  y_t = S_t · C_t + D_h · x_t
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemovl_trt.checkpoint.config import LLMConfig


@dataclass
class MambaState:
    """Per-sequence cache of one Mamba2 layer (both fp32, docs/model.md §6.2).

    conv: [Cd, K-1]   the last K-1 xBC inputs (before the conv)
    ssm:  [nh, hd, N] the SSM state
    """

    conv: torch.Tensor
    ssm: torch.Tensor


def naive_ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, initial_state: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSM recurrence one token at a time (test oracle and decode formula), all fp32.

    x [B,L,nh,hd], dt [B,L,nh] (after softplus/clamp), A [nh] (negative), B/C [B,L,ng,N], D [nh],
    initial_state [B,nh,hd,N] or None → (y [B,L,nh,hd], final state [B,nh,hd,N]).
    """
    b, seq, nh, hd = x.shape
    ng, n = B.shape[2], B.shape[3]
    state = (torch.zeros(b, nh, hd, n, dtype=torch.float32, device=x.device) if initial_state is None
             else initial_state.float().clone())
    Bh = B.float().repeat_interleave(nh // ng, dim=2)  # [B,L,nh,N], head h uses group h // (nh/ng)
    Ch = C.float().repeat_interleave(nh // ng, dim=2)
    ys = []
    for t in range(seq):
        state, y = ssm_step(state, x[:, t], dt[:, t], A, Bh[:, t], Ch[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step for a batch. state [B,nh,hd,N] fp32, x [B,nh,hd], dt [B,nh],
    A [nh], B/C [B,nh,N] (already expanded from groups to heads), D [nh] → (new state, y [B,nh,hd])."""
    x = x.float()
    dt = dt.float()
    decay = torch.exp(dt * A.float())  # [B,nh]
    # S ← exp(dt·A)·S + dt · x ⊗ B
    state = state * decay[:, :, None, None] + (dt[:, :, None] * x)[..., None] * B.float()[:, :, None, :]
    # y = S·C + D·x                                                     [B,nh,hd]
    y = torch.einsum("bhpn,bhn->bhp", state, C.float()) + D.float()[None, :, None] * x
    return state, y


def chunked_ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence as `naive_ssd_scan`, computed chunk by chunk (Mamba2 "SSD" form), all fp32.

    Within a chunk, outputs are an attention-like product C·Bᵀ masked by the lower-triangular decay
    exp(Σ_{s<k≤t} dt_k·A); states pass between chunks through a short sequential loop.
    Shapes as `naive_ssd_scan`; L need not be a multiple of `chunk_size`.
    """
    b, seq, nh, hd = x.shape
    ng, n = B.shape[2], B.shape[3]
    q = chunk_size
    pad = (q - seq % q) % q
    x = x.float()
    dt = dt.float()
    Bh = B.float().repeat_interleave(nh // ng, dim=2)  # [B,L,nh,N]
    Ch = C.float().repeat_interleave(nh // ng, dim=2)  # [B,L,nh,N]
    if pad:
        # zero padding at the end: dt = 0 means no decay and no input, so the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    nc = (seq + pad) // q
    x = x.view(b, nc, q, nh, hd)
    dt = dt.view(b, nc, q, nh)
    Bh = Bh.view(b, nc, q, nh, n)
    Ch = Ch.view(b, nc, q, nh, n)

    a = dt * A.float()  # [B,nc,Q,nh]  log-decay per step (≤ 0)
    acum = torch.cumsum(a, dim=2)  # [B,nc,Q,nh]  inclusive prefix sums
    # decay from position j to position i (j ≤ i) inside a chunk: exp(acum_i − acum_j)
    diff = acum[:, :, :, None, :] - acum[:, :, None, :, :]  # [B,nc,Q(i),Q(j),nh]
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    decay_ij = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], -math.inf))

    xdt = x * dt[..., None]  # [B,nc,Q,nh,hd]  dt·x
    # 1. intra-chunk (diagonal blocks): y_i += Σ_{j≤i} (C_i·B_j) exp(acum_i − acum_j) dt_j x_j
    scores = torch.einsum("bcihn,bcjhn->bcijh", Ch, Bh) * decay_ij  # [B,nc,Q,Q,nh]
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xdt)  # [B,nc,Q,nh,hd]

    # 2. state contributed by each chunk alone, at its end: Σ_j exp(acum_last − acum_j) dt_j x_j ⊗ B_j
    to_end = torch.exp(acum[:, :, -1:, :] - acum)  # [B,nc,Q,nh]
    chunk_states = torch.einsum("bcjhn,bcjhp->bchpn", Bh * to_end[..., None], xdt)  # [B,nc,nh,hd,N]

    # 3. inter-chunk recurrence: state entering chunk c+1 = exp(Σ a over chunk c)·S_in[c] + chunk_states[c]
    state = (torch.zeros(b, nh, hd, n, dtype=torch.float32, device=x.device) if initial_state is None
             else initial_state.float())
    chunk_decay = torch.exp(acum[:, :, -1, :])  # [B,nc,nh]
    states_in = []
    for c in range(nc):
        states_in.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    s_in = torch.stack(states_in, dim=1)  # [B,nc,nh,hd,N]

    # 4. contribution of the entering state: y_i += exp(acum_i) C_i · S_in
    y = y + torch.einsum("bcihn,bchpn->bcihp", Ch, s_in) * torch.exp(acum)[..., None]
    y = y + D.float()[None, None, None, :, None] * x  # D skip
    y = y.reshape(b, nc * q, nh, hd)[:, :seq]
    return y, state


class GatedRMSNorm(nn.Module):
    """Grouped RMSNorm of y·silu(z) (gate first, then norm), fp32 compute (docs/model.md §6.2)."""

    def __init__(self, hidden: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))  # [nh·hd]
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z [..., nh·hd] → fp32 [..., nh·hd]."""
        g = y.float() * F.silu(z.float())
        shape = g.shape
        g = g.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.float() * g.view(shape)


class Mamba2Mixer(nn.Module):
    """The `mixer` of an `M` layer. Parameter names equal the checkpoint's
    (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm`, `out_proj`)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads = cfg.mamba_num_heads
        self.head_dim = cfg.mamba_head_dim
        self.n_groups = cfg.n_groups
        self.state_size = cfg.ssm_state_size
        self.d_inner = cfg.mamba_d_inner
        self.conv_dim = cfg.mamba_conv_dim
        self.conv_kernel = cfg.conv_kernel
        self.chunk_size = cfg.chunk_size
        self.time_step_limit = cfg.time_step_limit
        if cfg.mamba_hidden_act != "silu":
            raise ValueError(f"mamba_hidden_act '{cfg.mamba_hidden_act}' is not supported (only silu).")
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.mamba_in_proj_dim, bias=cfg.mamba_proj_bias)
        # depthwise causal conv over time: weight [Cd,1,K], bias [Cd]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))  # [nh]
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))  # [nh]
        self.D = nn.Parameter(torch.ones(self.num_heads))  # [nh]
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)

    def new_state(self, device: torch.device | None = None) -> MambaState:
        """A zero state for one sequence (what a fresh prompt starts from)."""
        return MambaState(conv=torch.zeros(self.conv_dim, self.conv_kernel - 1, device=device),
                          ssm=torch.zeros(self.num_heads, self.head_dim, self.state_size, device=device))

    def _heads(self, g: torch.Tensor) -> torch.Tensor:
        """[B,ng,N] → [B,nh,N]: head h reads group h // (nh/ng)."""
        b, ng, n = g.shape
        return g[:, :, None, :].expand(b, ng, self.num_heads // ng, n).reshape(b, self.num_heads, n)

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        """dt = clamp(softplus(dt_raw + dt_bias), time_step_limit), fp32. [..., nh] → [..., nh]."""
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi != math.inf:
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def forward(self, hidden: torch.Tensor, states: list[MambaState]) -> torch.Tensor:
        """hidden [B,L,H] (model dtype) with one state per batch row (updated in place) → [B,L,H].

        L > 1 runs the chunked scan from the sequences' current states (prefill, or a continued
        prefill); L == 1 runs the one-step recurrence (decode). Every row has the same L.
        """
        b, seq, _ = hidden.shape
        zxbcdt = self.in_proj(hidden)  # [B,L,nh·hd + Cd + nh]
        z, xbc, dt_raw = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)

        # causal depthwise conv with the cached K-1 previous inputs in front (fp32)
        conv_prev = torch.stack([s.conv for s in states])  # [B,Cd,K-1]
        conv_in = torch.cat([conv_prev, xbc.float().transpose(1, 2)], dim=-1)  # [B,Cd,K-1+L]
        w = self.conv1d.weight.float()  # [Cd,1,K]
        bias = self.conv1d.bias.float() if self.conv1d.bias is not None else None
        if seq == 1:  # decode: out = SiLU(Σ_k w[:,k]·window[:,k] + b) over [K-1 cached, 1 new]
            xbc = (conv_in * w[:, 0]).sum(-1, keepdim=True)  # [B,Cd,1]
            if bias is not None:
                xbc = xbc + bias[:, None]
            xbc = F.silu(xbc).transpose(1, 2)  # [B,1,Cd]
        else:
            xbc = F.silu(F.conv1d(conv_in, w, bias, groups=self.conv_dim)).transpose(1, 2)  # [B,L,Cd]
        new_conv = conv_in[:, :, -(self.conv_kernel - 1):]  # [B,Cd,K-1]

        x, Bm, Cm = xbc.split([self.d_inner, self.n_groups * self.state_size,
                               self.n_groups * self.state_size], dim=-1)
        x = x.reshape(b, seq, self.num_heads, self.head_dim)  # [B,L,nh,hd]
        Bm = Bm.reshape(b, seq, self.n_groups, self.state_size)  # [B,L,ng,N]
        Cm = Cm.reshape(b, seq, self.n_groups, self.state_size)  # [B,L,ng,N]
        dt = self._dt(dt_raw)  # [B,L,nh]
        A = -torch.exp(self.A_log.float())  # [nh]
        ssm_prev = torch.stack([s.ssm for s in states])  # [B,nh,hd,N]

        if seq == 1:
            ssm_new, y = ssm_step(ssm_prev, x[:, 0], dt[:, 0], A, self._heads(Bm[:, 0]), self._heads(Cm[:, 0]),
                                  self.D)
            y = y[:, None]  # [B,1,nh,hd]
        else:
            y, ssm_new = chunked_ssd_scan(x, dt, A, Bm, Cm, self.D, self.chunk_size, ssm_prev)

        for i, s in enumerate(states):
            s.conv = new_conv[i].contiguous()
            s.ssm = ssm_new[i].contiguous()

        g = self.norm(y.reshape(b, seq, self.d_inner), z)  # [B,L,nh·hd] fp32
        return self.out_proj(g.to(hidden.dtype))  # [B,L,H]
