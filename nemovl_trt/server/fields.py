"""Field validators shared by the request schemas: each returns the value (None when absent) or raises a 400
APIError naming the field."""

from __future__ import annotations

import math
from typing import Any

from nemovl_trt.server.errors import invalid


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool) and math.isfinite(v)


def number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
           param: str | None = None) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    p = param or name
    if not is_num(v):
        raise invalid(f"'{p}' must be a number.", p)
    if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
        lb = "(" if lo_open else "["
        hb = ")" if hi_open else "]"
        raise invalid(f"'{p}' must be in {lb}{lo:g}, {hi:g}{hb}; got {v}.", p)
    return float(v)


def integer(body: dict, name: str, lo: int | None = None, hi: int | None = None,
            param: str | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    p = param or name
    if not is_int(v):
        raise invalid(f"'{p}' must be an integer.", p)
    if lo is not None and v < lo:
        raise invalid(f"'{p}' must be at least {lo}; got {v}.", p)
    if hi is not None and v > hi:
        raise invalid(f"'{p}' must be at most {hi}; got {v}.", p)
    return v


def boolean(body: dict, name: str, param: str | None = None) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise invalid(f"'{param or name}' must be a boolean.", param or name)
    return v


def request_model(body: Any) -> str:
    """The `model` of a request body, after checking the body is a JSON object (both are 400s)."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string.", "model")
    return model
