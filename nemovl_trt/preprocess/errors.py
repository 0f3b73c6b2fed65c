"""Typed preprocessing errors.

Every user-caused failure in `nemovl_trt.preprocess` raises `PreprocessError` with a stable `code`
(the API layer maps each one to HTTP 400 with that code) and an optional `param` naming the request
field at fault. Messages are one sentence, safe to show to users (no tracebacks, no paths).
"""

from __future__ import annotations

# The codes this package raises (docs/interfaces.md). Kept as constants so callers and tests can
# refer to them without typos.
INVALID_IMAGE = "invalid_image"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_TOO_LARGE = "image_too_large"
INVALID_VIDEO = "invalid_video"
INVALID_VIDEO_SAMPLING = "invalid_video_sampling"
TOO_MANY_IMAGES = "too_many_images"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INVALID_PARAMETER = "invalid_parameter"

ERROR_CODES = frozenset({
    INVALID_IMAGE, IMAGE_TOO_SMALL, IMAGE_TOO_LARGE, INVALID_VIDEO, INVALID_VIDEO_SAMPLING,
    TOO_MANY_IMAGES, CONTEXT_LENGTH_EXCEEDED, INVALID_PARAMETER,
})


class PreprocessError(ValueError):
    """A request's media or parameters cannot be preprocessed.

    Attributes:
        code: one of `ERROR_CODES`, e.g. ``"image_too_small"``.
        message: one user-facing sentence.
        param: the request field at fault (e.g. ``"max_num_tiles"``) or None.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown PreprocessError code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"PreprocessError(code={self.code!r}, message={self.message!r}, param={self.param!r})"
