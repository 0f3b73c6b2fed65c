"""Session fixtures of the triton area: `triton_repo_dir` (a repository generated from `cpu_engines_dir`)
and `triton_server` (a real tritonserver on free loopback ports serving it)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class RunningTriton:
    """What tests get from `triton_server`."""

    grpc_url: str  # "127.0.0.1:PORT"
    http_url: str  # "127.0.0.1:PORT"
    metrics_url: str
    repo: Path
    engines_dir: Path
    startup_s: float
    server: object  # nemovl_trt.triton.launcher.TritonServer


@pytest.fixture(scope="session")
def triton_repo_dir(cpu_engines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository for the cpu engines, generated into a temp dir (engines_dir parameter relative)."""
    from nemovl_trt.triton.generator import generate_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    generate_repository(cpu_engines_dir, out)
    return out


@pytest.fixture(scope="session")
def triton_server(triton_repo_dir: Path, cpu_engines_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real tritonserver on the generated repository; stopped (no stray process / shm) at session end."""
    from nemovl_trt.triton.launcher import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    t0 = time.monotonic()
    server = TritonServer(triton_repo_dir, log_path=log, echo=bool(os.environ.get("NEMOVL_TRITON_ECHO")),
                          ready_timeout_s=240)
    server.start()
    sys.stderr.write(f"\n[triton_server] ready in {time.monotonic() - t0:.1f} s (log {log})\n")
    try:
        yield RunningTriton(grpc_url=server.grpc_url, http_url=server.http_url, metrics_url=server.metrics_url,
                            repo=triton_repo_dir, engines_dir=cpu_engines_dir, startup_s=server.startup_s or 0.0,
                            server=server)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- client helpers
@dataclass
class StreamResult:
    """Everything one streamed `nemovl` request returned."""

    responses: list[dict]
    error: str | None
    seconds: float
    first_response_s: float | None

    @property
    def text(self) -> str:
        return "".join(r["text"] for r in self.responses)

    @property
    def token_ids(self) -> list[int]:
        return [t for r in self.responses for t in r["token_ids"]]

    @property
    def finish_reason(self) -> str:
        return self.responses[-1]["finish_reason"] if self.responses else ""

    @property
    def prompt_tokens(self) -> int:
        return self.responses[-1]["prompt_tokens"]

    @property
    def completion_tokens(self) -> int:
        return self.responses[-1]["completion_tokens"]

    @property
    def info(self) -> dict:
        import json

        return json.loads(self.responses[0]["info"])


def _bytes_input(name: str, values: list[bytes]):
    import numpy as np
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, [len(values)], "BYTES")
    t.set_data_from_numpy(np.array(values, dtype=np.object_))
    return t


def nemovl_inputs(messages: list[dict], params: dict | None = None, images: list[bytes] | None = None,
                  video: bytes | None = None, tools: list[dict] | None = None) -> list:
    """tritonclient InferInputs for the `nemovl` model."""
    import json

    inputs = [_bytes_input("messages", [json.dumps(messages).encode()])]
    if params is not None:
        inputs.append(_bytes_input("params", [json.dumps(params).encode()]))
    if images:
        inputs.append(_bytes_input("images", list(images)))
    if video is not None:
        inputs.append(_bytes_input("video", [video]))
    if tools is not None:
        inputs.append(_bytes_input("tools", [json.dumps(tools).encode()]))
    return inputs


def stream_nemovl(url: str, messages: list[dict], params: dict | None = None, images: list[bytes] | None = None,
                  video: bytes | None = None, cancel_after: int | None = None, timeout_s: float = 120.0,
                  ) -> StreamResult:
    """Send one request over gRPC streaming and collect the responses. With `cancel_after`, the stream is
    cancelled (client side, `stop_stream(cancel_requests=True)`) after that many responses."""
    import queue

    import tritonclient.grpc as grpcclient

    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: q.put((result, error, time.monotonic())))
    t0 = time.monotonic()
    client.async_stream_infer("nemovl", nemovl_inputs(messages, params, images, video), request_id="r")
    responses: list[dict] = []
    error = None
    first = None
    try:
        while True:
            result, err, t = q.get(timeout=timeout_s)
            if err is not None:
                error = err.message()
                break
            first = first if first is not None else t - t0
            responses.append({
                "text": result.as_numpy("text")[0].decode("utf-8"),
                "token_ids": [int(x) for x in result.as_numpy("token_ids").reshape(-1)],
                "finish_reason": result.as_numpy("finish_reason")[0].decode(),
                "prompt_tokens": int(result.as_numpy("prompt_tokens")[0]),
                "completion_tokens": int(result.as_numpy("completion_tokens")[0]),
                "info": result.as_numpy("info")[0].decode("utf-8"),
            })
            if responses[-1]["finish_reason"]:
                break
            if cancel_after is not None and len(responses) >= cancel_after:
                break
        seconds = time.monotonic() - t0
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()
    return StreamResult(responses, error, seconds, first)


def llm_control(url: str, op: dict) -> dict:
    """Send a control message to the `llm` model (e.g. {"op": "stats"}) and return its JSON answer."""
    import json
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    ids = grpcclient.InferInput("input_ids", [0], "INT64")
    ids.set_data_from_numpy(np.zeros((0,), dtype=np.int64))
    client.async_stream_infer("llm", [ids, _bytes_input("control", [json.dumps(op).encode()])])
    try:
        result, err = q.get(timeout=30)
        if err is not None:
            raise RuntimeError(err.message())
        return json.loads(result.as_numpy("info")[0].decode())
    finally:
        client.stop_stream()
        client.close()


# ------------------------------------------------------------------------------------------- media + reference
def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A deterministic RGB PNG (smooth gradients + noise) of the given size."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                    rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: int, fps: int, size: int = 64) -> bytes:
    """An H.264 MP4 of a bar moving across a tinted background (PyAV)."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            a = np.zeros((size, size, 3), np.uint8)
            a[..., 1] = (i * 10) % 256
            a[:, (i * 3) % size:(i * 3) % size + size // 8, 0] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@dataclass
class Reference:
    """The PyTorch reference (and the exact preprocessing the server runs), loaded once."""

    ctx: object  # nemovl_trt.triton.models.pipeline.EntryContext
    model: object  # NemotronVLM
    onnx: object  # onnxruntime.InferenceSession on the built vision graph
    eos_ids: tuple[int, ...]

    def inputs(self, messages: list[dict], params: dict | None = None, images: list[bytes] | None = None,
               video: bytes | None = None) -> tuple[list[int], object, dict]:
        """(prompt ids, mm embeddings torch [M,D] or None, preprocess info) exactly as the server builds them."""
        import json

        import numpy as np
        import torch

        from nemovl_trt.triton.models.pipeline import apply_video_evs, preprocess_request

        res = preprocess_request(self.ctx, json.dumps(messages).encode(), list(images or []), video, None,
                                 json.dumps(params or {}).encode())
        ids, mm = res.input_ids, None
        if res.pixel_values.shape[0]:
            name_in = self.onnx.get_inputs()[0].name
            emb = self.onnx.run(None, {name_in: res.pixel_values})[0].astype(np.float32)
            if res.info["video"] is not None:
                ids, mm, _ = apply_video_evs(self.ctx, ids, emb, res.info["video"])
            else:
                mm = emb.reshape(-1, emb.shape[-1])
        return [int(i) for i in ids], (torch.from_numpy(np.ascontiguousarray(mm)) if mm is not None else None), \
            res.info

    def generate(self, messages: list[dict], params: dict | None = None, images: list[bytes] | None = None,
                 video: bytes | None = None) -> list[int]:
        """Token ids the reference engine generates for this request (called directly, no Triton)."""
        from nemovl_trt.model.engine import generate
        from nemovl_trt.model.sampling import SamplingParams
        from nemovl_trt.runtime.reference_batcher import sampling_params_from

        ids, mm, info = self.inputs(messages, params, images, video)
        sp = sampling_params_from(SamplingParams, info["sampling"])
        return generate(self.model, ids, mm, sp, self.eos_ids)


@pytest.fixture(scope="session")
def triton_reference(cpu_engines_dir: Path) -> Reference:
    import onnxruntime as ort

    from nemovl_trt.checkpoint.loader import load_checkpoint
    from nemovl_trt.model.vlm import NemotronVLM
    from nemovl_trt.triton.models import manifest as mf
    from nemovl_trt.triton.models.common import read_manifest
    from nemovl_trt.triton.models.pipeline import EntryContext

    manifest = read_manifest(cpu_engines_dir)
    ctx = EntryContext.load(cpu_engines_dir, manifest)
    ckpt = load_checkpoint(mf.llm_dir(cpu_engines_dir, manifest))
    model = NemotronVLM.from_checkpoint(ckpt)
    sess = ort.InferenceSession(str(mf.vision_onnx(cpu_engines_dir, manifest)), providers=["CPUExecutionProvider"])
    return Reference(ctx=ctx, model=model, onnx=sess, eos_ids=ctx.eos_ids)
