"""Read the upstream contract data (tests/data/upstream/*.json) and check calls against it.

The data records names and signatures as they are in TensorRT-LLM, TensorRT and ModelOpt's own source
(with file and commit per name); `check_call` binds a call's arguments to a recorded signature, so a
keyword the upstream function does not have fails here on CPU, with the upstream file and commit named.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data" / "upstream"
LIBRARIES = ("tensorrt_llm", "tensorrt", "modelopt")
_KINDS = {"positional_or_keyword": inspect.Parameter.POSITIONAL_OR_KEYWORD,
          "keyword_only": inspect.Parameter.KEYWORD_ONLY,
          "var_positional": inspect.Parameter.VAR_POSITIONAL,
          "var_keyword": inspect.Parameter.VAR_KEYWORD}


class UpstreamContractError(TypeError):
    """A call or a name that does not exist upstream."""


@functools.cache
def upstream(lib: str) -> dict[str, Any]:
    return json.loads((DATA_DIR / f"{lib}.json").read_text(encoding="utf-8"))


def symbol(lib: str, name: str) -> dict[str, Any]:
    try:
        return upstream(lib)["symbols"][name]
    except KeyError:
        raise UpstreamContractError(f"{name} is not recorded in tests/data/upstream/{lib}.json") from None


def where(lib: str, name: str) -> str:
    s = symbol(lib, name)
    return f"{upstream(lib)['repository']} {s['file']}@{s['commit'][:8]}"


def fields(lib: str, name: str) -> set[str]:
    return set(symbol(lib, name).get("fields", {}))


def members(lib: str, name: str) -> set[str]:
    return set(symbol(lib, name).get("members", []))


@functools.cache
def signature(lib: str, name: str) -> inspect.Signature:
    """inspect.Signature of a recorded function or method (without self)."""
    params, seen_kw_only = [], False
    for p in symbol(lib, name).get("params", []):
        kind = _KINDS[p.get("kind", "positional_or_keyword")]
        if kind == inspect.Parameter.VAR_POSITIONAL:
            seen_kw_only = True
        if seen_kw_only and kind == inspect.Parameter.POSITIONAL_OR_KEYWORD:
            kind = inspect.Parameter.KEYWORD_ONLY
        default = p["default"] if "default" in p else inspect.Parameter.empty
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            default = inspect.Parameter.empty
        params.append(inspect.Parameter(p["name"].lstrip("*"), kind, default=default))
    # upstream may list required parameters after defaulted ones (keyword-only): make those keyword-only
    fixed, had_default = [], False
    for prm in params:
        if prm.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD and prm.default is inspect.Parameter.empty and had_default:
            prm = prm.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        had_default = had_default or prm.default is not inspect.Parameter.empty
        fixed.append(prm)
    order = {inspect.Parameter.POSITIONAL_OR_KEYWORD: 0, inspect.Parameter.VAR_POSITIONAL: 1,
             inspect.Parameter.KEYWORD_ONLY: 2, inspect.Parameter.VAR_KEYWORD: 3}
    fixed.sort(key=lambda q: order[q.kind])  # stable: upstream order within each kind
    return inspect.Signature(fixed)


def check_call(lib: str, name: str, args: tuple = (), kwargs: dict | None = None) -> inspect.BoundArguments:
    """Bind a call to the recorded signature; UpstreamContractError naming the upstream source otherwise."""
    try:
        bound = signature(lib, name).bind(*args, **(kwargs or {}))
    except TypeError as e:
        raise UpstreamContractError(f"{name}: {e} (upstream: {where(lib, name)})") from None
    return bound


def check_keys(lib: str, name: str, keys: Any, also: tuple[str, ...] = ()) -> None:
    """Every key must be a recorded field of `name` (a pydantic model with extra='forbid', a dataclass, ...)."""
    unknown = sorted(set(keys) - fields(lib, name) - set(also))
    if unknown:
        raise UpstreamContractError(f"{name} has no field {unknown[0]!r} (upstream: {where(lib, name)})")
