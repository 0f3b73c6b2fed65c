"""GPU targets: TensorRT-LLM's LLM API (PyTorch backend) behind `LlmEngine`.

One `tensorrt_llm.LLM` on the bundle (`LLM(model=bundle, **llm_api_options)`) and one long-lived asyncio
event loop in one thread, as TensorRT-LLM's own Triton LLM-API model does: each request is a coroutine on
that loop iterating `LLM.generate_async(inputs, sampling_params=..., streaming=True)`. The prompt is our
final token ids plus our vision embeddings (`trtllm_requests.prompt_inputs`), accepted by the input
processor `trtllm_processor.install_embeddings_processor` registers before the LLM is built. A watcher on
the same loop aborts requests whose requester went away. Design and upstream names: docs/trtllm.md.

Choices: upstream returns one CompletionOutput per sequence in `RequestOutput.outputs`, each with its own
cumulative `token_ids` / `logprobs`; a streamed response updates one sequence, so the generator keeps its
own sent length per output index (upstream's `token_ids_diff` only tracks the sequence of the last
response). See `trtllm_requests.choice_layout` for greedy n > 1 and best_of.

Not exercised on the CPU machines: the tests drive this class with an enforcing fake of tensorrt_llm
(tests/fake_tensorrt_llm.py) whose signatures come from TensorRT-LLM's source.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemovl_trt.runtime.engine_api import ERROR_PREFIX, GenRequest
from nemovl_trt.runtime.trtllm_processor import install_embeddings_processor
from nemovl_trt.runtime.trtllm_requests import (
    ChoiceLayout,
    choice_layout,
    embeddings_tensor,
    finish_reason,
    prompt_inputs,
    prompt_logprobs,
    sampling_kwargs,
    token_logprobs,
)

CANCEL_POLL_S = 0.05  # how often running requests' requesters are asked whether they went away
CLOSE_TIMEOUT_S = 30.0
DEFAULT_EMBEDDING_DTYPE = "bfloat16"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def import_tensorrt_llm() -> Any:
    """The `tensorrt_llm` module on a machine with a CUDA device; one clear RuntimeError otherwise."""
    try:
        import tensorrt_llm  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError("this target needs tensorrt_llm and an NVIDIA GPU; none found (run the repository "
                           "in NVIDIA's TensorRT-LLM / Triton container).") from None
    if not cuda_available():
        raise RuntimeError("this target needs an NVIDIA GPU; none found.")
    return tensorrt_llm


def bundle_embedding_dtype(bundle_dir: Path) -> str:
    """The dtype the LLM runs its embeddings in: the bundle config's `torch_dtype` ("bfloat16" when absent
    or when the weights are quantized: FP8/NVFP4 checkpoints keep 16-bit activations)."""
    path = bundle_dir / "config.json"
    if not path.is_file():
        return DEFAULT_EMBEDDING_DTYPE
    cfg = json.loads(path.read_text(encoding="utf-8"))
    name = str(cfg.get("torch_dtype") or (cfg.get("llm_config") or {}).get("torch_dtype") or "")
    return name if name in ("bfloat16", "float16", "float32") else DEFAULT_EMBEDDING_DTYPE


def bundle_special_ids(bundle_dir: Path) -> dict[str, int]:
    """Ids of the special tokens our grammars name (<TOOLCALL>, </TOOLCALL>, </think>) in the bundle's
    tokenizer; {} when the bundle has no tokenizer.json (those grammars are then refused)."""
    if not (Path(bundle_dir) / "tokenizer.json").is_file():
        return {}
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer
    from nemovl_trt.model.grammar import THINK_CLOSE, TOOL_CLOSE, TOOL_OPEN

    special = load_tokenizer(bundle_dir).special
    return {k: int(special[k]) for k in (TOOL_OPEN, TOOL_CLOSE, THINK_CLOSE) if k in special}


@dataclass
class _Running:
    req: GenRequest
    result: Any = None  # the RequestOutput of generate_async
    done: bool = False
    open: set[int] = field(default_factory=lambda: {0})  # our choice indices not finished yet
    sent: dict[int, int] = field(default_factory=dict)  # upstream output index -> token ids sent
    prompt_sent: bool = False


@dataclass
class _Counters:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    cancelled_ids: list[str] = field(default_factory=list)


class TrtllmGenerator:
    """`LlmEngine` over TensorRT-LLM. `llm_api_options` are the bundle's llm_api_options.yaml."""

    def __init__(self, bundle_dir: Path, llm_api_options: dict[str, Any], cancel_poll_s: float = CANCEL_POLL_S
                 ) -> None:
        trtllm = import_tensorrt_llm()
        install_embeddings_processor()  # before LLM(): it builds its input processor from the registry
        self._sampling_params = trtllm.SamplingParams
        self._dtype = bundle_embedding_dtype(Path(bundle_dir))
        self._grammar_backend = str(llm_api_options.get("guided_decoding_backend") or "llguidance")
        self._special_ids = bundle_special_ids(Path(bundle_dir))
        self.llm = trtllm.LLM(model=str(bundle_dir), **llm_api_options)
        self.cancel_poll_s = cancel_poll_s
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-loop", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._watch_requesters(), self._loop)

    # ---- LlmEngine (any thread) ----
    def submit(self, req: GenRequest) -> None:
        with self._lock:
            self._counters.submitted += 1
            self._running[req.request_id] = _Running(req)
        asyncio.run_coroutine_threadsafe(self._generate(req), self._loop)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            run = self._running.get(request_id)
        if run is None:
            return False
        self._loop.call_soon_threadsafe(self._abort, run)
        return True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            return {"active": sorted(self._running), "queued": [], "submitted": c.submitted,
                    "completed": c.completed, "cancelled": c.cancelled, "failed": c.failed,
                    "cancelled_ids": list(c.cancelled_ids[-100:])}

    def close(self) -> None:
        with self._lock:
            runs = list(self._running.values())
        for run in runs:
            self._loop.call_soon_threadsafe(self._abort, run)
        try:
            asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop).result(timeout=CLOSE_TIMEOUT_S)
            self.llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    async def _cancel_tasks(self) -> None:
        """End every coroutine on the loop (the watcher and unfinished requests) before it stops."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the loop ----
    def _count(self, run: _Running, reason: str) -> None:
        with self._lock:
            self._running.pop(run.req.request_id, None)
            if reason == "cancelled":
                self._counters.cancelled += 1
                self._counters.cancelled_ids.append(run.req.request_id)
            elif reason.startswith(ERROR_PREFIX):
                self._counters.failed += 1
            else:
                self._counters.completed += 1

    def _send(self, run: _Running, index: int, ids: list[int], reason: str, logprobs: dict | None) -> None:
        """One message for our choice `index`; the request's last one (every choice closed) is final."""
        if run.done or index not in run.open:
            return
        if reason:
            run.open.discard(index)
        last = not run.open
        if last:
            run.done = True
            self._count(run, reason)
        try:
            run.req.sink.send(ids, reason, index=index, logprobs=logprobs, done=last)
        except Exception:  # noqa: BLE001 - the requester is gone
            if not last:
                self._abort(run)

    def _finish(self, run: _Running, reason: str) -> None:
        """End every open choice with `reason` ("cancelled" or "error:..."; an error is one final message)."""
        if run.done:
            return
        if reason.startswith(ERROR_PREFIX):
            run.open = {min(run.open)}
        for index in sorted(run.open):
            self._send(run, index, [], reason, None)

    def _abort(self, run: _Running) -> None:
        if run.result is not None and not run.done:
            run.result.abort()
        self._finish(run, "cancelled")

    def _emit(self, run: _Running, layout: ChoiceLayout, completion: Any, final: bool) -> None:
        """New ids (and logprobs) of one upstream output → its choice(s); closes them when it has finished
        (or the request has: upstream sets finish_reason only on the response that ends the request)."""
        opts = run.req.sampling
        src = int(completion.index)
        ids = list(completion.token_ids)  # cumulative over the stream
        start = run.sent.get(src, 0)
        new = ids[start:]
        run.sent[src] = len(ids)
        reason = ""
        if completion.finish_reason is not None:
            reason = finish_reason(completion.finish_reason)
        elif ids and ids[-1] in set(opts.get("stop_token_ids") or ()):
            reason = "stop"  # a stop id is kept in the output (include_stop_str_in_output) and ends it
        elif len(ids) >= int(opts["max_new_tokens"]):
            reason = "length"  # upstream names it only on the request's last response: known here already
        elif final:
            reason = "stop"  # ended by the end id, which is not part of token_ids
        if not new and not reason:
            return
        payload: dict[str, Any] | None = None
        if opts.get("logprobs") is not None and new:
            payload = {"tokens": token_logprobs(new, list(completion.logprobs or [])[start:len(ids)],
                                                int(opts["logprobs"]))}
        if opts.get("prompt_logprobs") is not None and not run.prompt_sent and src == 0 and \
                completion.prompt_logprobs:
            run.prompt_sent = True
            payload = {**(payload or {"tokens": []}), "prompt": prompt_logprobs(
                list(run.req.input_ids), completion.prompt_logprobs, int(opts["prompt_logprobs"]))}
        first = src * layout.copies
        for index in range(first, first + layout.copies):
            self._send(run, index, new, reason, payload)

    async def _generate(self, req: GenRequest) -> None:
        with self._lock:
            run = self._running.get(req.request_id)
        if run is None or run.done:  # cancelled before it started
            return
        try:
            layout = choice_layout(req.sampling)
            run.open = set(range(layout.n))
            params = self._sampling_params(**sampling_kwargs(
                req.sampling, grammar_backend=self._grammar_backend, special_ids=self._special_ids))
            inputs = prompt_inputs(req.input_ids, embeddings_tensor(req.mm_embeddings, self._dtype))
            run.result = self.llm.generate_async(inputs, sampling_params=params, streaming=True)
            async for out in run.result:
                if run.done:  # aborted meanwhile
                    return
                if layout.ranked and not out.finished:
                    continue  # upstream re-ranks the outputs on every response: send the n best at the end
                for completion in out.outputs:
                    self._emit(run, layout, completion, final=bool(out.finished))
                if out.finished:
                    self._finish(run, "stop")  # nothing should be open; never leave the requester waiting
                    return
            self._finish(run, "cancelled" if run.result.aborted() else "stop")
        except asyncio.CancelledError:  # the generator is closing
            self._finish(run, "cancelled")
            raise
        except Exception as e:  # noqa: BLE001 - reported to this request only
            self._finish(run, f"{ERROR_PREFIX}{e}")

    async def _watch_requesters(self) -> None:
        """Abort requests whose requester went away (each check may be an IPC round trip: throttled)."""
        while True:
            await asyncio.sleep(self.cancel_poll_s)
            with self._lock:
                runs = list(self._running.values())
            for run in runs:
                try:
                    gone = run.req.sink.is_cancelled()
                except Exception:  # noqa: BLE001 - a requester that cannot be asked is gone
                    gone = True
                if gone:
                    self._abort(run)
