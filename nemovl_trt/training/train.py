"""Train the tiny checkpoint on the synthetic visual-QA tasks (`nemovl-build train-tiny`).

What makes the trained weights valid for the served stack: every input goes through the production
code — `preprocess.image.image_to_tiles` (the checkpoint's mean/std, the server's default tile budget
of 12), `preprocess.video.preprocess_video` on the encoded MP4 (default 2 fps sampling),
`preprocess.evs` on the projected frame embeddings (q = the checkpoint config's video_pruning_rate),
and `preprocess.prompt.build_prompt` / `rebuild_video_prompt` with the checkpoint's chat template —
and through the reference model's modules (`NemotronVLM.vision_model`, pixel shuffle, `.mlp1`,
`.language_model`, `NemotronVLM.embed`). The one substitution is the attention kernel: training
runs `torch.nn.functional.scaled_dot_product_attention` in place of the reference's explicit softmax
(same math; outputs agree to ~1e-6, checked by tests/test_training_train.py), because it is several
times faster on CPU. The saved checkpoint is the `make-checkpoint --preset tiny` format exactly: the
writer makes config/tokenizer/random weights for the seed, then the trained tensors replace the
weights under the same names, shapes, dtype and file conventions.

Recipe: start from the writer's random weights for the seed, the ViT's residual-branch outputs scaled
by 0.1; keep the ViT at those weights (frozen: its near-linear random features keep colour, texture,
edges and layout, and a frozen ViT needs no backward pass) and
train mlp1 + the LLM with AdamW (warm-up, cosine decay). Each step is one "round" of the task family:
two shape images (each answers its colour and its shape), three counting images, one word image, one
detail image (3 tiles) and two videos (each answers its first and its last colour) — 13 answers. The
loss is the cross-entropy of the answer tokens and the stop token only.

Speed (2 cores): a background process prepares the next rounds (decoding, tiling, the frozen ViT) on
one core while the trainer runs mlp1 + LLM on the other; each media's prompt prefix runs once and is
forked for its questions; the LM head runs only at answer positions; mlp1 takes gradients only for
the video rows EVS keeps. Deterministic for a seed: data are a function of (seed, step), the worker
and the trainer each run one thread, `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import random
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nemovl_trt.checkpoint.config import VLMConfig
from nemovl_trt.checkpoint.loader import load_checkpoint
from nemovl_trt.checkpoint.synth import save_tensors, write_checkpoint
from nemovl_trt.checkpoint.tokenizer import TURN_END
from nemovl_trt.model.mamba2 import MambaState
from nemovl_trt.model.nemotron_h import Attention, KVCache, SequenceState
from nemovl_trt.model.radio import RadioVisionModel, ViTAttention
from nemovl_trt.model.vision import shuffle_tokens
from nemovl_trt.model.vlm import NemotronVLM
from nemovl_trt.preprocess.image import image_to_tiles
from nemovl_trt.preprocess.video import preprocess_video
from nemovl_trt.training import prompts
from nemovl_trt.training.tasks import QUESTIONS, SYSTEM_PROMPT, Sample, generate_sample

PRESET = "tiny"
DEFAULT_STEPS = 750  # ~17 min on 2 cores; data/tiny-trained was trained with --steps 1200 (margin for the CI gate)
DEFAULT_SEED = 0
DEFAULT_MAX_NUM_TILES = 12  # the server's default tile budget (docs/api.md: mm_processor_kwargs default 12)
NUM_THREADS = 2
# One step's media: the cheap single-tile kinds twice (they need the most examples), counting three times (with
# two, 4 vs 5 dots stayed the weakest answer: 17/20 on one unseen eval seed), detail once, video twice.
ROUND_MEDIA: tuple[str, ...] = ("shape", "shape", "count", "count", "count", "read", "detail", "video", "video")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. `video_pruning_rates` (EVS q) alternate over steps; None = the checkpoint
    config's `video_pruning_rate` (0.7 for tiny, the rate the 12B was trained with)."""

    steps: int = DEFAULT_STEPS
    seed: int = DEFAULT_SEED
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 40
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_num_tiles: int = DEFAULT_MAX_NUM_TILES
    video_pruning_rates: tuple[float, ...] | None = None
    minutes: float | None = None  # wall-clock cap; stopping early makes the result machine-dependent
    threads: int = NUM_THREADS
    media: tuple[str, ...] = ROUND_MEDIA  # what one step's round holds (tests use a cheaper subset)
    vit_residual_scale: float = 0.1  # scales the ViT's residual-branch outputs of the writer's random init
    data_worker: bool = True  # prepare rounds (decode, tiles, frozen ViT) in a background process
    log_every: int = 25


@dataclass
class TrainReport:
    """What a run did: steps done, seconds, the loss curve (mean per log window) and per-type
    teacher-forced accuracy over the last log window."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    final_accuracy: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


# ------------------------------------------------------------------------------------ fast attention
def _sdpa_forward(self: ViTAttention, x: torch.Tensor) -> torch.Tensor:
    """ViTAttention.forward with the fused kernel: x [N,T,hid] → [N,T,hid] (same math as the reference)."""
    n, t, hid = x.shape
    qkv = self.qkv(x).view(n, t, 3, self.nh, self.d).permute(2, 0, 3, 1, 4)  # [3,N,nh,T,d]
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.d ** -0.5)  # [N,nh,T,d]
    return self.proj(out.transpose(1, 2).reshape(n, t, hid))


def _causal_sdpa_forward(self: Attention, hidden: torch.Tensor, caches: list[Any]) -> torch.Tensor:
    """LLM Attention.forward with the fused causal kernel when the caches are empty (a prompt's first
    forward; the new keys/values become the caches, so every row must be unpadded), the reference
    path otherwise: hidden [B,L,H] → [B,L,H]. No positional encoding, GQA by head repetition."""
    if any(c.length for c in caches):
        return Attention.forward(self, hidden, caches)
    b, seq, _ = hidden.shape
    q = self.q_proj(hidden).view(b, seq, self.nq, self.d).transpose(1, 2)  # [B,nq,L,d]
    k = self.k_proj(hidden).view(b, seq, self.nkv, self.d).transpose(1, 2)  # [B,nkv,L,d]
    v = self.v_proj(hidden).view(b, seq, self.nkv, self.d).transpose(1, 2)
    for i, c in enumerate(caches):
        c.k, c.v = k[i], v[i]  # [nkv,L,d]
    rep = self.nq // self.nkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B,nq,L,d]
    return self.o_proj(out.transpose(1, 2).reshape(b, seq, self.nq * self.d))


@contextlib.contextmanager
def fused_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every ViT attention and every LLM attention of `model` uses
    `scaled_dot_product_attention` (the LLM one only for cache-free full-sequence forwards)."""
    patched = []
    for m in model.modules():
        if isinstance(m, ViTAttention):
            m.forward = types.MethodType(_sdpa_forward, m)
            patched.append(m)
        elif isinstance(m, Attention):
            m.forward = types.MethodType(_causal_sdpa_forward, m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# ----------------------------------------------------------------------------------------- the data
@dataclass
class Example:
    """One training sequence: prompt ids + answer ids (answer tokens + stop), the media embeddings
    source (`media` index into the round's media list) and the type for logging."""

    qtype: str
    prompt_ids: list[int]
    answer_ids: list[int]
    media: int


@dataclass
class PreparedMedia:
    """One image or video of a round after everything that does not train: preprocessing and the frozen
    ViT. `features` [n, P, C'] are the pixel-shuffled ViT outputs of its n tiles (or frames);
    `timestamps` (seconds) is set for a video; `qas` are its (question type, answer) pairs."""

    features: torch.Tensor
    qas: list[tuple[str, str]]
    timestamps: list[float] | None = None


def round_samples(step: int, seed: int, media: tuple[str, ...] = ROUND_MEDIA
                  ) -> list[tuple[Sample, list[tuple[str, str]]]]:
    """The media of one training step with their (question type, answer) pairs (deterministic).

    A shape image answers both `color` and `shape`; a video both `video_first` and `video_last`.
    `media` selects which of `ROUND_MEDIA` the round holds (all by default).
    """
    def shape(index: int) -> tuple[Sample, list[tuple[str, str]]]:
        img = generate_sample("color", index, seed, "train")
        return img, [("color", img.meta["color"]), ("shape", img.meta["kind"])]

    def single(qtype: str, index: int) -> tuple[Sample, list[tuple[str, str]]]:
        sample = generate_sample(qtype, index, seed, "train")
        return sample, [(qtype, sample.answer)]

    def video(index: int) -> tuple[Sample, list[tuple[str, str]]]:
        clip = generate_sample("video_first", index, seed, "train")
        frames = clip.meta["frames"]  # the colour of every frame, in order
        return clip, [("video_first", frames[0]), ("video_last", frames[-1])]

    makers = {"shape": shape, "count": lambda i: single("count", i), "read": lambda i: single("read", i),
              "detail": lambda i: single("detail", i), "video": video}
    out = []
    for pos, kind in enumerate(media):
        per_step = media.count(kind)
        out.append(makers[kind](step * per_step + media[:pos].count(kind)))  # unique index per kind
    return out


class FrozenVision:
    """The frozen half of the model: production preprocessing, then RADIO → drop prefix → pixel shuffle
    (no gradients, fused attention). Lives in the trainer, or alone in the data worker process."""

    def __init__(self, vcfg: VLMConfig, vision_state: dict[str, torch.Tensor], max_num_tiles: int):
        self.vcfg = vcfg
        self.max_num_tiles = max_num_tiles
        self.vit = RadioVisionModel(vcfg.vision)
        self.vit.load_state_dict(vision_state, strict=True)
        self.vit.eval().requires_grad_(False)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] normalised pixels → [N, tokens_per_tile, shuffled_dim]."""
        with fused_attention(self.vit):
            feats = self.vit(pixels)  # [N,h·w,C]
        return shuffle_tokens(feats, self.vcfg)

    def prepare(self, step: int, seed: int, media: tuple[str, ...]) -> list[PreparedMedia]:
        """The round of `step`: every image through `image_to_tiles`, every video through
        `preprocess_video`, all of them through the ViT (one batch for the round's image tiles)."""
        c = self.vcfg
        tiles: list[np.ndarray] = []
        out: list[PreparedMedia] = []
        for sample, qas in round_samples(step, seed, media):
            if sample.video is not None:
                vt = preprocess_video(sample.video, c.norm_mean, c.norm_std, tile=c.force_image_size, threads=1)
                out.append(PreparedMedia(self.features(torch.from_numpy(vt.pixel_values)), qas,
                                         [float(t) for t in vt.timestamps]))
            else:
                tiles.append(image_to_tiles(sample.image, self.max_num_tiles, c.norm_mean, c.norm_std,
                                            tile=c.force_image_size, use_thumbnail=c.use_thumbnail, parallel=False))
                out.append(PreparedMedia(torch.empty(0), qas))
        if tiles:
            feats = self.features(torch.from_numpy(np.concatenate(tiles)))
            images = (m for m in out if m.timestamps is None)
            for m, split in zip(images, torch.split(feats, [t.shape[0] for t in tiles]), strict=True):
                m.features = split
        return out


_WORKER: FrozenVision | None = None


def _worker_init(vcfg: VLMConfig, vision_state: dict[str, torch.Tensor], max_num_tiles: int) -> None:
    global _WORKER
    torch.set_num_threads(1)  # one core for the data, the rest for the trainer
    _WORKER = FrozenVision(vcfg, vision_state, max_num_tiles)


def _worker_prepare(step: int, seed: int, media: tuple[str, ...]) -> list[PreparedMedia]:
    assert _WORKER is not None
    return _WORKER.prepare(step, seed, media)


class RoundPrefetcher:
    """Prepares rounds `ahead` steps in advance in one background process (spawned, 1 thread), so the
    frozen-ViT and decoding work overlaps the trainer's step. Results are the same as in-process
    preparation with 1 thread: every round is a function of (seed, step)."""

    def __init__(self, vision: FrozenVision, seed: int, media: tuple[str, ...], ahead: int = 2):
        self.seed, self.media, self.ahead = seed, media, ahead
        self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                        initargs=(vision.vcfg, vision.vit.state_dict(), vision.max_num_tiles))
        self.pending: dict[int, Future[list[PreparedMedia]]] = {}

    def get(self, step: int, last: int) -> list[PreparedMedia]:
        """The round of `step`, queueing the following ones up to `last` (exclusive)."""
        for s in range(step, min(step + self.ahead + 1, last)):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(_worker_prepare, s, self.seed, self.media)
        return self.pending.pop(step).result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio`·lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    """Holds the model, tokenizer and optimizer of one run (mlp1 + LLM train; the ViT is frozen)."""

    def __init__(self, base_dir: Path, cfg: TrainConfig):
        self.cfg = cfg
        self.ckpt = load_checkpoint(base_dir)
        self.vcfg = self.ckpt.config
        self.tok = self.ckpt.tokenizer
        self.stop_id = self.tok.special[TURN_END]
        self.model = NemotronVLM.from_checkpoint(self.ckpt, "float32")
        self.model.train()
        scale_residual_outputs(self.model.vision_model, cfg.vit_residual_scale)
        for name, p in self.model.named_parameters():
            p.requires_grad_(not name.startswith("vision_model."))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
        self.vision = FrozenVision(self.vcfg, self.model.vision_model.state_dict(), cfg.max_num_tiles)

    def answer_ids(self, answer: str) -> list[int]:
        """Answer tokens followed by the stop token (id read from the tokenizer)."""
        return self.tok.encode(answer) + [self.stop_id]

    def build_round(self, step: int, prepared: list[PreparedMedia] | None = None
                    ) -> tuple[list[torch.Tensor], list[Example]]:
        """The media embeddings of the step's round and the examples that use them.

        `prepared` is the round from `FrozenVision.prepare` (made here when None). Returns (rows,
        examples): rows[m] [M,D] are the embeddings media m's placeholders take (mlp1 with gradients;
        for a video only the rows EVS keeps, in (t, p) order).
        """
        c = self.vcfg
        rates = self.cfg.video_pruning_rates or (c.video_pruning_rate,)
        q = rates[step % len(rates)]
        if prepared is None:
            prepared = self.vision.prepare(step, self.cfg.seed, self.cfg.media)
        rows: list[torch.Tensor] = []
        examples: list[Example] = []
        for m, pm in enumerate(prepared):
            if pm.timestamps is not None:
                with torch.no_grad():  # EVS scores every frame token; only the kept ones need gradients
                    scored = self.model.mlp1(pm.features)  # [T,P,D]
                keep, prompt_for = prompts.video_prompt(self.tok, c, pm.timestamps, scored, q)
                rows.append(self.model.mlp1(pm.features.reshape(-1, pm.features.shape[-1])[keep]))
                for qtype, ans in pm.qas:
                    examples.append(Example(qtype, prompt_for(sample_messages(qtype, "video")),
                                            self.answer_ids(ans), m))
            else:
                emb = self.model.mlp1(pm.features)  # [n,P,D]
                rows.append(emb.reshape(-1, emb.shape[-1]))
                for qtype, ans in pm.qas:
                    ids = prompts.image_prompt(self.tok, c, sample_messages(qtype, "image"), [emb.shape[0]])
                    examples.append(Example(qtype, ids, self.answer_ids(ans), m))
        return rows, examples

    def answer_hidden(self, rows: list[torch.Tensor], examples: list[Example]) -> torch.Tensor:
        """Final hidden states at the positions that predict each example's answer tokens, in example
        order: [Σ len(answer_ids), H].

        Each media's prompt prefix (up to its last placeholder) is shared by its questions, so it runs
        once (prefixes of equal length batched, none padded), and every example continues from a fork
        of its media's state with its question + answer (one right-padded batch).
        """
        lm = self.model.language_model
        ctx = self.vcfg.img_context_token_id
        cuts = [len(ex.prompt_ids) - ex.prompt_ids[::-1].index(ctx) for ex in examples]
        prefix: dict[int, list[int]] = {}
        for ex, cut in zip(examples, cuts, strict=True):
            if prefix.setdefault(ex.media, ex.prompt_ids[:cut]) != ex.prompt_ids[:cut]:
                raise ValueError(f"the questions of media {ex.media} do not share its prompt prefix")
        states: dict[int, SequenceState] = {m: lm.new_state() for m in prefix}
        by_len: dict[int, list[int]] = {}
        for m, ids in prefix.items():
            by_len.setdefault(len(ids), []).append(m)
        for group in by_len.values():
            x = torch.stack([self.model.embed(prefix[m], rows[m]) for m in group])  # [b,P,H]
            lm.hidden_states(x, [states[m] for m in group])
        tails = [ex.prompt_ids[cut:] + ex.answer_ids for ex, cut in zip(examples, cuts, strict=True)]
        length = max(len(t) for t in tails)
        pad = self.tok.special[TURN_END]  # any id: right padding is never read by earlier positions
        x = lm.embed_tokens(torch.tensor([t + [pad] * (length - len(t)) for t in tails]))  # [E,T,H]
        hidden = lm.hidden_states(x, [fork_state(states[ex.media]) for ex in examples])  # [E,T,H]
        # position j of a tail predicts its token j+1: the answer starts after the prompt's last token
        return torch.cat([hidden[e, len(ex.prompt_ids) - cut - 1:len(tails[e]) - 1]
                          for e, (ex, cut) in enumerate(zip(examples, cuts, strict=True))])

    # ---- one step
    def step(self, step: int, prepared: list[PreparedMedia] | None = None
             ) -> tuple[float, dict[str, tuple[int, int]]]:
        """One optimizer step on the round of `step`. Returns (mean answer-token loss,
        {type: (correct, total)} of teacher-forced argmax answers)."""
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.cfg)
        rows, examples = self.build_round(step, prepared)
        hidden = self.answer_hidden(rows, examples)  # [Σ answer tokens, H]
        target = torch.tensor([t for ex in examples for t in ex.answer_ids])
        logits = self.model.language_model.lm_head(hidden).float()  # [Σ answer tokens, V]
        loss_sum = F.cross_entropy(logits, target, reduction="sum")
        n_tok = len(target)
        stats: dict[str, tuple[int, int]] = {}
        with torch.no_grad():
            hit = (logits.argmax(-1) == target).tolist()
            cursor = 0
            for ex in examples:
                k = len(ex.answer_ids)
                c, t = stats.get(ex.qtype, (0, 0))
                stats[ex.qtype] = (c + int(all(hit[cursor:cursor + k])), t + 1)
                cursor += k
        loss = loss_sum / n_tok
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return float(loss.detach()), stats

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors with every trained parameter replaced (same names, dtypes, order)."""
        state = self.model.state_dict()
        out = {}
        for name, t in self.ckpt.tensors.items():
            t = t() if callable(t) else t
            new = state.get(name)
            out[name] = (new.detach().to(t.dtype).contiguous().clone() if new is not None else t)
        return out


def fork_state(state: SequenceState) -> SequenceState:
    """A copy of a sequence's state that can continue on its own (the model replaces, never mutates,
    state tensors, so sharing them is safe and keeps the autograd graph)."""
    return SequenceState(mamba={i: MambaState(conv=s.conv, ssm=s.ssm) for i, s in state.mamba.items()},
                         kv={i: KVCache(k=c.k, v=c.v) for i, c in state.kv.items()}, num_tokens=state.num_tokens)


RESIDUAL_OUTPUTS = ("attn.proj", "mlp.fc2")


@torch.no_grad()
def scale_residual_outputs(vit: torch.nn.Module, scale: float) -> None:
    """Multiply the weights of every ViT layer that writes into the residual stream (`attn.proj`,
    `mlp.fc2`) by `scale`. At 0.1 the frozen random ViT stays close to its patch embedding, a random
    linear sketch of each 16×16 patch that keeps local edges and their directions (the shape and word
    questions need them); at 1.0 three random blocks blur them (measured: shape stays at chance)."""
    for name, module in vit.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(RESIDUAL_OUTPUTS):
            module.weight.mul_(scale)


def sample_messages(qtype: str, media: str) -> list[dict[str, Any]]:
    """The chat messages of a question: the system prompt, then [media part, question]."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": media, "index": 0}, {"type": "text", "text": QUESTIONS[qtype]}]}]


def set_determinism(seed: int, threads: int = NUM_THREADS) -> None:
    """Seed every RNG and fix the thread count (float reductions depend on it)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)


def train(out_dir: str | Path, cfg: TrainConfig, log: Callable[[str], None] = print,
          force: bool = False) -> TrainReport:
    """Train and write the checkpoint into `out_dir` (the `make-checkpoint --preset tiny` format)."""
    set_determinism(cfg.seed, trainer_threads(cfg))
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="nemovl-train-") as tmp:
        base = Path(tmp) / "base"
        write_checkpoint(base, PRESET, seed=cfg.seed)
        trainer = Trainer(base, cfg)
        report = run_steps(trainer, cfg, log)
        tensors = trainer.trained_tensors()
    write_checkpoint(out, PRESET, seed=cfg.seed, force=force)
    for p in out.glob("model*.safetensors*"):
        p.unlink()
    save_tensors(out, tensors)
    return report


def trainer_threads(cfg: TrainConfig) -> int:
    """Threads of the training process: one of `cfg.threads` goes to the data worker when there is one."""
    return max(1, cfg.threads - 1) if cfg.data_worker else cfg.threads


def run_steps(trainer: Trainer, cfg: TrainConfig, log: Callable[[str], None]) -> TrainReport:
    """The training loop (no files): `cfg.steps` steps or until `cfg.minutes` run out."""
    t0 = time.monotonic()
    report = TrainReport(steps=0, seconds=0.0)
    window_loss: list[float] = []
    window_stats: dict[str, tuple[int, int]] = {}
    prefetch = RoundPrefetcher(trainer.vision, cfg.seed, cfg.media) if cfg.data_worker else None
    try:
        with fused_attention(trainer.model):
            for step in range(cfg.steps):
                prepared = prefetch.get(step, cfg.steps) if prefetch else None
                loss, stats = trainer.step(step, prepared)
                window_loss.append(loss)
                for k, (c, t) in stats.items():
                    c0, t0_ = window_stats.get(k, (0, 0))
                    window_stats[k] = (c0 + c, t0_ + t)
                report.steps = step + 1
                last = step + 1 == cfg.steps
                over = cfg.minutes is not None and time.monotonic() - t0 > cfg.minutes * 60
                if (step + 1) % cfg.log_every == 0 or last or over:
                    mean = sum(window_loss) / len(window_loss)
                    report.losses.append(mean)
                    acc = {k: c / t for k, (c, t) in window_stats.items()}
                    report.final_accuracy = acc
                    elapsed = time.monotonic() - t0
                    eta = elapsed / (step + 1) * (cfg.steps - step - 1)
                    log(f"step {step + 1}/{cfg.steps}  loss {mean:.4f}  {elapsed:6.0f}s (eta {eta / 60:4.1f} min)  "
                        + " ".join(f"{k}={v:.2f}" for k, v in sorted(acc.items())))
                    window_loss, window_stats = [], {}
                if over and not last:
                    report.stopped_early = True
                    log(f"stopping after {step + 1} steps: the {cfg.minutes:g}-minute budget is spent "
                        f"(the result now depends on this machine's speed).")
                    break
    finally:
        if prefetch:
            prefetch.close()
    report.seconds = time.monotonic() - t0
    return report
