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

Recipe: start from the writer's random weights for the seed with every residual-branch output
projection scaled by 0.1; keep the ViT at those weights (frozen: RADIO's random features keep
colour, texture and layout, and a frozen ViT makes a step ~3× cheaper) and train mlp1 + the LLM
with AdamW (warm-up, cosine decay). Each step is one "round" of the task family: two shape images
(each answers its colour and its shape), two counting images, one word image, one detail image
(3 tiles) and two videos (each answers its first and its last colour) — 11 answers. The loss is the cross-entropy
of the answer tokens and the stop token only. Deterministic for a seed and thread count: data are a
function of (seed, step), `torch.manual_seed(seed)`, 2 threads.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nemovl_trt.checkpoint.loader import load_checkpoint
from nemovl_trt.checkpoint.synth import save_tensors, write_checkpoint
from nemovl_trt.checkpoint.tokenizer import TURN_END
from nemovl_trt.model.nemotron_h import Attention
from nemovl_trt.model.projector import pixel_shuffle
from nemovl_trt.model.radio import ViTAttention
from nemovl_trt.model.vlm import NemotronVLM
from nemovl_trt.preprocess.image import image_to_tiles
from nemovl_trt.preprocess.video import preprocess_video
from nemovl_trt.training import prompts
from nemovl_trt.training.tasks import QUESTIONS, Sample, generate_sample

PRESET = "tiny"
DEFAULT_STEPS = 1200
DEFAULT_SEED = 0
DEFAULT_MAX_NUM_TILES = 12  # the server's default tile budget (api.md: mm_processor_kwargs default 12)
NUM_THREADS = 2
# One step's media: the cheap single-tile kinds twice (they need the most examples), detail and video once.
ROUND_MEDIA: tuple[str, ...] = ("shape", "shape", "count", "count", "read", "detail", "video", "video")


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
    freeze_vision: bool = True  # train mlp1 + LLM on the seed's ViT features (3× cheaper steps)
    residual_init_scale: float = 0.1  # scales the writer's random init of every residual-branch output
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
    """LLM Attention.forward for a fresh full-sequence forward (empty caches, as in training) with the
    fused causal kernel: hidden [B,L,H] → [B,L,H]. No positional encoding, GQA by head repetition."""
    if any(c.length for c in caches):
        raise ValueError("the fused training attention only runs full sequences from an empty cache")
    b, seq, _ = hidden.shape
    q = self.q_proj(hidden).view(b, seq, self.nq, self.d).transpose(1, 2)  # [B,nq,L,d]
    k = self.k_proj(hidden).view(b, seq, self.nkv, self.d).transpose(1, 2)  # [B,nkv,L,d]
    v = self.v_proj(hidden).view(b, seq, self.nkv, self.d).transpose(1, 2)
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
        shown = [c for c in clip.meta["frames"] if c is not None]
        return clip, [("video_first", shown[0]), ("video_last", shown[-1])]

    makers = {"shape": shape, "count": lambda i: single("count", i), "read": lambda i: single("read", i),
              "detail": lambda i: single("detail", i), "video": video}
    out = []
    for pos, kind in enumerate(media):
        per_step = media.count(kind)
        out.append(makers[kind](step * per_step + media[:pos].count(kind)))  # unique index per kind
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio`·lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    """Holds the model, tokenizer and optimizer of one run."""

    def __init__(self, base_dir: Path, cfg: TrainConfig):
        self.cfg = cfg
        self.ckpt = load_checkpoint(base_dir)
        self.vcfg = self.ckpt.config
        self.tok = self.ckpt.tokenizer
        self.stop_id = self.tok.special[TURN_END]
        self.model = NemotronVLM.from_checkpoint(self.ckpt, "float32")
        self.model.train()
        scale_residual_outputs(self.model, cfg.residual_init_scale)
        for name, p in self.model.named_parameters():
            p.requires_grad_(not (cfg.freeze_vision and name.startswith("vision_model.")))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.98))

    # ---- media → embeddings + prompts
    def _image_tiles(self, rgb: np.ndarray) -> np.ndarray:
        c = self.vcfg
        return image_to_tiles(rgb, self.cfg.max_num_tiles, c.norm_mean, c.norm_std, tile=c.force_image_size,
                              use_thumbnail=c.use_thumbnail, parallel=False)

    def answer_ids(self, answer: str) -> list[int]:
        """Answer tokens followed by the stop token (id read from the tokenizer)."""
        return self.tok.encode(answer) + [self.stop_id]

    def build_round(self, step: int) -> tuple[list[np.ndarray | torch.Tensor], list[Example]]:
        """The media of the step's round and the examples that use them.

        Returns (media, examples): media[m] is float32 tiles [n,3,S,S] (numpy) for an image, which
        the step encodes with ViT gradients, or the kept video embeddings [R,D] (torch; the ViT ran
        without gradients, mlp1 with them) for a video.
        """
        c = self.vcfg
        rates = self.cfg.video_pruning_rates or (c.video_pruning_rate,)
        q = rates[step % len(rates)]
        media: list[np.ndarray | torch.Tensor] = []
        examples: list[Example] = []
        for m, (sample, qas) in enumerate(round_samples(step, self.cfg.seed, self.cfg.media)):
            if sample.video is not None:
                vt = preprocess_video(sample.video, c.norm_mean, c.norm_std, tile=c.force_image_size, threads=1)
                with torch.no_grad():
                    feats = self.vision_features(torch.from_numpy(vt.pixel_values))
                emb = self.model.mlp1(feats)  # [T,P,D]
                keep, prompt_for = prompts.video_prompt(self.tok, c, vt, emb.detach(), q)
                media.append(emb.reshape(-1, emb.shape[-1])[keep])  # [R,D] in (t, p) order
                for qtype, ans in qas:
                    examples.append(Example(qtype, prompt_for(sample_messages(qtype, "video")),
                                            self.answer_ids(ans), m))
            else:
                tiles = self._image_tiles(sample.image)
                media.append(tiles)
                for qtype, ans in qas:
                    ids = prompts.image_prompt(self.tok, c, sample_messages(qtype, "image"), [tiles.shape[0]])
                    examples.append(Example(qtype, ids, self.answer_ids(ans), m))
        return media, examples

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision path without mlp1: RADIO → drop prefix → pixel shuffle.
        [N,3,S,S] → [N, tokens_per_tile, shuffled_dim]."""
        feats = self.model.vision.vision_model(pixels)  # [N,h·w,C]
        n, _, ch = feats.shape
        g = self.vcfg.patches_per_side
        shuffled = pixel_shuffle(feats.reshape(n, g, g, ch), self.vcfg.downsample_ratio, self.vcfg.ps_version)
        return shuffled.reshape(n, -1, shuffled.shape[-1])

    def media_embeddings(self, media: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Per media the embedding rows [M,D] its placeholders take: the image tiles of the whole round
        go through one ViT batch (with gradients)."""
        image_tiles = torch.from_numpy(np.concatenate([m for m in media if isinstance(m, np.ndarray)]))
        with torch.set_grad_enabled(not self.cfg.freeze_vision):
            feats = self.vision_features(image_tiles)  # [n,P,shuffled_dim]
        emb = self.model.mlp1(feats)  # [n,P,D]
        out: list[torch.Tensor] = []
        cursor = 0
        for m in media:
            if isinstance(m, np.ndarray):
                out.append(emb[cursor:cursor + m.shape[0]].reshape(-1, emb.shape[-1]))
                cursor += m.shape[0]
            else:
                out.append(m)
        return out

    # ---- one step
    def step(self, step: int) -> tuple[float, dict[str, tuple[int, int]]]:
        """One optimizer step on the round of `step`. Returns (mean answer-token loss,
        {type: (correct, total)} of teacher-forced argmax answers)."""
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.cfg)
        media, examples = self.build_round(step)
        rows = self.media_embeddings(media)
        seqs, targets = [], []
        for ex in examples:
            ids = ex.prompt_ids + ex.answer_ids
            seqs.append(self.model.embed(ids, rows[ex.media]))  # [L,D]
            tgt = torch.full((len(ids),), -100, dtype=torch.int64)
            start = len(ex.prompt_ids)
            tgt[start - 1:len(ids) - 1] = torch.tensor(ex.answer_ids)  # position i predicts token i+1
            targets.append(tgt)
        loss_sum = torch.zeros(())
        n_tok = sum(len(ex.answer_ids) for ex in examples)
        stats: dict[str, tuple[int, int]] = {}
        for group in length_groups([s.shape[0] for s in seqs]):
            length = max(seqs[i].shape[0] for i in group)
            x = torch.stack([F.pad(seqs[i], (0, 0, 0, length - seqs[i].shape[0])) for i in group])
            y = torch.stack([F.pad(targets[i], (0, length - targets[i].shape[0]), value=-100) for i in group])
            logits = self.model.language_model(inputs_embeds=x)  # [b,L,V] fp32; right padding is causal-safe
            loss_sum = loss_sum + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                  ignore_index=-100, reduction="sum")
            with torch.no_grad():
                pred = logits.argmax(-1)
                for row, i in enumerate(group):
                    mask = y[row] != -100
                    ok = bool((pred[row][mask] == y[row][mask]).all())
                    c, t = stats.get(examples[i].qtype, (0, 0))
                    stats[examples[i].qtype] = (c + int(ok), t + 1)
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


RESIDUAL_OUTPUTS = ("o_proj", "out_proj", "down_proj", "attn.proj", "mlp.fc2")


@torch.no_grad()
def scale_residual_outputs(model: torch.nn.Module, scale: float) -> None:
    """Multiply the weights of every layer that writes into a residual stream (LLM `o_proj`,
    `out_proj`, `down_proj`; ViT `attn.proj`, `mlp.fc2`) by `scale`: each block starts close to the
    identity, so image features reach the answer position from the first step (the usual
    small-residual-branch initialisation for training from scratch)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(RESIDUAL_OUTPUTS):
            module.weight.mul_(scale)


def sample_messages(qtype: str, media: str) -> list[dict[str, Any]]:
    """The chat messages of a question: system "/no_think", then [media part, question]."""
    return [{"role": "system", "content": "/no_think"},
            {"role": "user", "content": [{"type": media, "index": 0}, {"type": "text", "text": QUESTIONS[qtype]}]}]


def length_groups(lengths: list[int], max_ratio: float = 1.5) -> list[list[int]]:
    """Indices grouped so each group's longest sequence is at most `max_ratio`× its shortest
    (less padding per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= max_ratio * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def set_determinism(seed: int, threads: int = NUM_THREADS) -> None:
    """Seed every RNG and fix the thread count (float reductions depend on it)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)


def train(out_dir: str | Path, cfg: TrainConfig, log: Callable[[str], None] = print,
          force: bool = False) -> TrainReport:
    """Train and write the checkpoint into `out_dir` (the `make-checkpoint --preset tiny` format)."""
    set_determinism(cfg.seed, cfg.threads)
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


def run_steps(trainer: Trainer, cfg: TrainConfig, log: Callable[[str], None]) -> TrainReport:
    """The training loop (no files): `cfg.steps` steps or until `cfg.minutes` run out."""
    t0 = time.monotonic()
    report = TrainReport(steps=0, seconds=0.0)
    window_loss: list[float] = []
    window_stats: dict[str, tuple[int, int]] = {}
    with fused_attention(trainer.model):
        for step in range(cfg.steps):
            loss, stats = trainer.step(step)
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
                log(f"step {step + 1}/{cfg.steps}  loss {mean:.4f}  {elapsed:6.0f}s  "
                    + " ".join(f"{k}={v:.2f}" for k, v in sorted(acc.items())))
                window_loss, window_stats = [], {}
            if over and not last:
                report.stopped_early = True
                log(f"stopping after {step + 1} steps: the {cfg.minutes:g}-minute budget is spent "
                    f"(the result now depends on this machine's speed).")
                break
    report.seconds = time.monotonic() - t0
    return report
