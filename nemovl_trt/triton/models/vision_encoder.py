"""Triton Python model `vision_encoder` for the cpu target: the built ONNX graph on ONNX Runtime.

Tiles `[N,3,S,S]` float32 → projected embeddings `[N,P,hidden]`. Dynamic batching hands `execute` several
requests; their tiles run as one ONNX Runtime call and the result is split back. (GPU targets use
`platform: "tensorrt_plan"` on the same graph's TensorRT plan instead of this file.)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from nemovl_trt.triton.models import manifest as mf
from nemovl_trt.triton.models.common import model_parameters, read_manifest, resolve_engines_dir


class TritonPythonModel:
    """The cpu `vision_encoder` model."""

    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort

        engines = resolve_engines_dir(args)
        manifest = read_manifest(engines)
        params = model_parameters(args)
        opts = ort.SessionOptions()
        threads = int(params.get("intra_op_threads") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(mf.vision_onnx(engines, manifest)), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.onnx_input = self.session.get_inputs()[0].name
        self.onnx_output = self.session.get_outputs()[0].name
        cfg = json.loads(args["model_config"])
        self.input_name = cfg["input"][0]["name"]
        self.output_name = cfg["output"][0]["name"]

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        try:
            batch = np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=np.float32)
            out = self.session.run([self.onnx_output], {self.onnx_input: batch})[0].astype(np.float32, copy=False)
        except Exception as e:  # noqa: BLE001 - answer every request with the error, keep serving
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"vision_encoder: {e}"))
                    for _ in requests]
        responses = []
        start = 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, out[start:start + n])]))
            start += n
        return responses
