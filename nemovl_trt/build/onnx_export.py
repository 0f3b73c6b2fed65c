"""Vision encoder (RADIO → pixel shuffle → mlp1) → ONNX, and the ONNX Runtime vs PyTorch check.

The exported graph: input `pixel_values` float32 [N,3,S,S] (normalised tiles, N dynamic), output
`vision_embeddings` float32 [N, tokens_per_tile, llm_hidden]. Inside, the weights and every op run in the
target's vision precision (fp32 / fp16 / bf16: one Cast after the input, one before the output), because
TensorRT builds strongly typed networks and takes its precisions from the graph. The CPE position embedding
of one S×S tile is computed once in PyTorch and stored as a constant initializer, so the graph has no
interpolation. The legacy TorchScript exporter is used: it handles the dynamic tile axis directly and is
~10× faster than the dynamo exporter on this graph, with identical numerics.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nemovl_trt.checkpoint.config import VLMConfig

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "vision_embeddings"
TILE_AXIS = "num_tiles"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VISION_PREFIXES = ("vision_model.", "mlp1.")


class OnnxCheckError(RuntimeError):
    """The exported graph disagrees with PyTorch beyond the target's tolerance (or cannot run)."""


class _ExportedEncoder(nn.Module):
    """VisionEncoder in `dtype` with its 512-tile position embedding folded into a buffer.
    float32 [N,3,S,S] → float32 [N, tokens_per_tile, llm_hidden]."""

    def __init__(self, encoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        pos = encoder.tile_position_embedding().detach()  # [1, patches², vit_hidden], fp32 compute
        self.encoder = copy.deepcopy(encoder).to(dtype).eval()
        self.dtype = dtype
        self.register_buffer("tile_pos_embed", pos.to(dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels.to(self.dtype), self.tile_pos_embed).float()


def load_vision_encoder(ckpt_dir: str | Path) -> tuple[VLMConfig, nn.Module]:
    """The PyTorch `VisionEncoder` of a checkpoint in fp32, eval mode, with its `vision_model.*` + `mlp1.*`
    tensors loaded strictly. Reads only those tensors (not the LLM's), so it also works on a 12B or an
    already-quantized checkpoint (the vision tower is never quantized)."""
    from safetensors import safe_open

    from nemovl_trt.checkpoint.config import load_vlm_config
    from nemovl_trt.checkpoint.loader import weight_files
    from nemovl_trt.model.vision import VisionEncoder

    cfg = load_vlm_config(ckpt_dir)
    enc = VisionEncoder(cfg)
    wanted = set(enc.state_dict())
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(ckpt_dir).items():
        if name in wanted:
            by_file.setdefault(path, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for n in names:
                t = f.get_tensor(n)
                state[n] = t.float() if t.dtype.is_floating_point else t
    # Parameters must all be present; RADIO's buffers (input conditioner, summary_idxs) are optional and unused.
    missing = sorted({n for n, _ in enc.named_parameters()} - set(state))
    if missing:
        from nemovl_trt.checkpoint.config import CheckpointError
        raise CheckpointError(f"{ckpt_dir} is missing vision tensor '{missing[0]}'.")
    enc.load_state_dict(state, strict=False)
    return cfg, enc.float().eval()


def export_vision_onnx(cfg: VLMConfig, encoder: nn.Module, out_path: Path, precision: str, opset: int) -> Path:
    """Export `encoder` to `out_path` (opset `opset`, dynamic tile axis, weights/ops in `precision`)."""
    side = cfg.force_image_size
    wrapper = _ExportedEncoder(encoder, TORCH_DTYPES[precision]).eval()
    example = torch.zeros(2, 3, side, side)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / tracer warnings
        torch.onnx.export(
            wrapper, (example,), str(out_path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=False, do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: TILE_AXIS}, OUTPUT_NAME: {0: TILE_AXIS}},
        )
    return out_path


@dataclass(frozen=True)
class OnnxCheck:
    """Result of running the ONNX graph on ONNX Runtime against the fp32 PyTorch reference."""

    batch_sizes: tuple[int, ...]
    max_abs_error: float  # max over all batches and elements of |onnx − torch|
    max_abs_reference: float  # max |torch| (scale of the outputs)
    tolerance: float
    passed: bool
    output_shape_per_tile: tuple[int, ...]  # (tokens_per_tile, llm_hidden)
    seed: int
    provider: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_vision_onnx(cfg: VLMConfig, encoder: nn.Module, onnx_path: Path, tolerance: float,
                      batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> OnnxCheck:
    """Run the graph on random normal tiles (batches of `batch_sizes`) with ONNX Runtime (CPU) and compare with
    the fp32 PyTorch encoder. Raises `OnnxCheckError` when ONNX Runtime cannot run the graph or the shapes
    differ; `passed` is False when max abs error > tolerance (or is not finite)."""
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types (e.g. NOT_IMPLEMENTED for bf16 on CPU)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxCheckError(f"ONNX Runtime cannot run {onnx_path.name} ({first}).") from None
    gen = torch.Generator().manual_seed(seed)
    side = cfg.force_image_size
    max_err = max_ref = 0.0
    shape: tuple[int, ...] = ()
    for b in batch_sizes:
        tiles = torch.randn(b, 3, side, side, generator=gen)
        with torch.no_grad():
            ref = encoder(tiles).float().numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: tiles.numpy()})[0]
        if got.shape != ref.shape:
            raise OnnxCheckError(f"ONNX output shape {list(got.shape)} differs from PyTorch {list(ref.shape)} "
                                 f"for {b} tiles.")
        err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
        max_err = err if not np.isfinite(err) else max(max_err, err)
        max_ref = max(max_ref, float(np.max(np.abs(ref))))
        shape = tuple(int(s) for s in ref.shape[1:])
        if not np.isfinite(max_err):
            break
    passed = bool(np.isfinite(max_err) and max_err <= tolerance)
    return OnnxCheck(batch_sizes=tuple(batch_sizes), max_abs_error=max_err, max_abs_reference=max_ref,
                     tolerance=tolerance, passed=passed, output_shape_per_tile=shape, seed=seed,
                     provider=sess.get_providers()[0])
