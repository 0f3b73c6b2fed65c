"""Engine runtime: the generation loops the `llm` Triton model drives, independent of Triton.

Both engines implement `engine_api.LlmEngine` (submit / cancel / snapshot / close) and stream token ids
to a request's `Sink`:
- `reference_batcher.ContinuousBatcher`: the cpu target, continuous batching over the PyTorch reference.
- `trtllm_generator.TrtllmGenerator`: GPU targets, TensorRT-LLM's LLM API (PyTorch backend) fed with our
  own vision embeddings (see docs/trtllm.md).
`load_engine` picks one from the build manifest.
"""

from nemovl_trt.runtime.engine_api import GenRequest, LlmEngine, Sink
from nemovl_trt.runtime.loader import load_engine

__all__ = ["GenRequest", "LlmEngine", "Sink", "load_engine"]
