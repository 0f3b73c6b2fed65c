"""Triton Python model `preprocessor` (KIND_CPU): chat template, media decode, tiling, frame sampling,
token expansion and limits (`pipeline.preprocess_request`). Bad input → TritonError INVALID_ARG whose
message is `[<code>] <one sentence>`."""

from __future__ import annotations

import json
import traceback
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from nemovl_trt.preprocess.errors import PreprocessError
from nemovl_trt.preprocess.image import warmup as image_warmup
from nemovl_trt.preprocess.video import check_video_decoder
from nemovl_trt.triton.models.common import (
    bytes_scalar,
    bytes_tensor,
    model_parameters,
    read_manifest,
    resolve_engines_dir,
)
from nemovl_trt.triton.models.pipeline import EntryContext, preprocess_request


def _opt_bytes(request: Any, name: str) -> bytes | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return bytes_scalar(t.as_numpy()) if t is not None else None


class TritonPythonModel:
    """The `preprocessor` model."""

    def initialize(self, args: dict[str, Any]) -> None:
        engines = resolve_engines_dir(args)
        self.ctx = EntryContext.load(engines, read_manifest(engines), model_parameters(args))
        # a decoder this machine cannot run fails the model load with one line, not the first video request
        check_video_decoder(self.ctx.video_decoder)
        # compile (or load from numba's cache) the exact resize kernels now, not on the first image request;
        # False means the (slower, same output) Pillow path serves
        self.fast_image_kernels = image_warmup()

    def _one(self, request: Any) -> Any:
        images_t = pb_utils.get_input_tensor_by_name(request, "images")
        images = [bytes(x) for x in images_t.as_numpy().reshape(-1)] if images_t is not None else []
        try:
            res = preprocess_request(self.ctx, _opt_bytes(request, "messages"), images,
                                     _opt_bytes(request, "video"), _opt_bytes(request, "tools"),
                                     _opt_bytes(request, "params"), _opt_bytes(request, "prompt"))
        except PreprocessError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"[{e.code}] {e.message}", pb_utils.TritonError.INVALID_ARG))
        except Exception as e:  # noqa: BLE001 - an internal error for this request only
            pb_utils.Logger.log_error(f"preprocessor: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error in preprocessor: {e}"))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", res.input_ids.astype(np.int64)),
            pb_utils.Tensor("pixel_values", res.pixel_values),
            pb_utils.Tensor("info", bytes_tensor(json.dumps(res.info))),
        ])

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]
