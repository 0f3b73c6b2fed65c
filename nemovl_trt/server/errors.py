"""OpenAI error envelope: every failure the frontend reports has the shape
`{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`."""

from __future__ import annotations

from typing import Any

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error for the client. `status` is the HTTP status; `code` a stable machine-readable code."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_server_error")

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI envelope, ready to be JSON-encoded."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_parameter") -> APIError:
    """A 400 `invalid_request_error` about one request field."""
    return APIError(400, message, code=code, param=param)


def not_supported(message: str, param: str) -> APIError:
    """A 400 for a field we understand but do not implement (never silently dropped)."""
    return APIError(400, message, code="unsupported_parameter", param=param)
