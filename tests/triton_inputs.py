"""tritonclient `InferInput`s of a TritonRequest (the frontend's own client builds protobufs directly,
`triton_client.build_request`): for tests that talk to Triton with tritonclient itself, and as the independent
serialisation the frontend's requests are compared with."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from nemovl_trt.server.triton_client import TritonRequest, request_tensors


def build_inputs(req: TritonRequest) -> list[grpcclient.InferInput]:
    """The request's BYTES tensors (`request_tensors`) as tritonclient InferInputs, shape [elements]."""
    inputs = []
    for name, values in request_tensors(req):
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        inp = grpcclient.InferInput(name, [len(values)], "BYTES")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs
