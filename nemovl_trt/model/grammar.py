"""Structured output: a grammar engine (llguidance) that masks the logits so the output is a valid JSON
document for a schema, any JSON object, or a tool call of the allowed tools.

A *spec* is the JSON-able description a request carries (frontend → Triton → the `llm` model):
  {"type": "json_object"}
  {"type": "json_schema", "schema": {...}, "strict": bool}
  {"type": "tool_calls", "tools": [{"name": str, "parameters": {...} | null, "strict": bool}], "parallel": bool}
plus an optional "reasoning": true (the prompt opened a thinking block: any text up to `</think>` comes
first). JSON is compact (no whitespace between tokens): a model cannot pad it forever. Tool calls are the
model's own format, `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>` with the two special
tokens, exactly one call unless "parallel".

`validate_spec` (the frontend, no tokenizer) and `GrammarCompiler.compile` (the engine) share the grammar
text, so a schema the frontend accepts is one the engine compiles. Why llguidance and not xgrammar: see
docs/api.md "Structured output" (measured with benchmarks/grammar_engines.py).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

SPEC_TYPES = ("json_object", "json_schema", "tool_calls")
TOOL_OPEN, TOOL_CLOSE, THINK_CLOSE = "<TOOLCALL>", "</TOOLCALL>", "</think>"
CACHE_SIZE = 256

# JSON Schema keywords (2020-12 core, applicator, validation, format and meta-data vocabularies, plus the
# common draft-7 `definitions` and OpenAPI's `discriminator` / `nullable` that pydantic emits). In a strict
# schema any other key is an error; llguidance then refuses the known keywords it does not implement.
KNOWN_KEYWORDS = frozenset({
    "$schema", "$id", "$ref", "$defs", "definitions", "$comment", "$anchor", "$dynamicRef", "$dynamicAnchor",
    "$vocabulary", "type", "enum", "const", "properties", "required", "additionalProperties",
    "patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired",
    "dependentSchemas", "unevaluatedProperties", "items", "prefixItems", "additionalItems", "contains",
    "minContains", "maxContains", "minItems", "maxItems", "uniqueItems", "unevaluatedItems", "allOf", "anyOf",
    "oneOf", "not", "if", "then", "else", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minLength", "maxLength", "pattern", "format", "contentEncoding", "contentMediaType",
    "contentSchema", "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "discriminator", "nullable",
})
# Keywords whose value is a map name → subschema / a subschema / a list of subschemas.
_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_ONE_KEYS = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
             "propertyNames", "unevaluatedProperties", "unevaluatedItems", "contentSchema")
_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems")


def _short(message: str) -> str:
    """llguidance's error without the grammar listing it appends: 'at 1(8): failed to compile JSON schema:
    Unimplemented keys: ["uniqueItems"]\n 1 | start: ...' → 'Unimplemented keys: ["uniqueItems"]'."""
    lines = []
    for line in (message or "").splitlines():
        if re.match(r"^\s*\d+ \|", line):
            break
        if line.strip() and line.strip() != "^":
            lines.append(line.strip())
    text = " ".join(lines)
    head, sep, tail = text.partition("failed to compile JSON schema: ")
    text = tail if sep else re.sub(r"^at \d+\(\d+\): ", "", text)
    return text.strip()[:300] or "the grammar is invalid"


class GrammarError(ValueError):
    """A spec the grammar engine cannot compile; `param` says where in the request (frontend's name)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def spec_key(spec: dict[str, Any]) -> str:
    """Canonical text of a spec: the compile-cache key."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_keywords(schema: Any, path: str = "#") -> None:
    """Strict schemas: every key of every (sub)schema must be a JSON Schema keyword."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise GrammarError(f"the schema at {path} must be an object or a boolean.")
    for key, value in schema.items():
        if key not in KNOWN_KEYWORDS and not key.startswith("x-"):
            raise GrammarError(f"unknown JSON Schema keyword '{key}' at {path}.")
        if key in _MAP_KEYS and isinstance(value, dict):
            for name, sub in value.items():
                check_keywords(sub, f"{path}/{key}/{name}")
        elif key in _ONE_KEYS and isinstance(value, dict | bool):
            check_keywords(value, f"{path}/{key}")
        elif key in _LIST_KEYS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_keywords(sub, f"{path}/{key}/{i}")


def _with_options(schema: Any, strict: bool) -> dict[str, Any]:
    """The schema with llguidance's compile options: compact JSON; unimplemented keywords are errors in a
    strict schema and ignored otherwise."""
    base: dict[str, Any] = dict(schema) if isinstance(schema, dict) else ({} if schema else {"not": {}})
    base["x-guidance"] = {**(base.get("x-guidance") or {}), "whitespace_flexible": False, "lenient": not strict}
    return base


def _call_schema(tools: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """One tool call `{"name": <allowed>, "arguments": <that tool's parameters>}` as one schema."""
    variants = []
    strict = True
    for t in tools:
        params = t.get("parameters")
        strict = strict and bool(t.get("strict"))
        args = params if isinstance(params, dict) and params else {"type": "object"}
        variants.append({"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": args},
                         "required": ["name", "arguments"], "additionalProperties": False})
    return (variants[0] if len(variants) == 1 else {"anyOf": variants}), strict


def _token(ids: dict[str, int] | None, text: str) -> str:
    """A special token in llguidance's Lark: by id (`<[id]>`) in the engine, as text for validation."""
    return f"<[{ids[text]}]>" if ids is not None else json.dumps(text)


def grammar_text(spec: dict[str, Any], special_ids: dict[str, int] | None = None) -> str:
    """The llguidance grammar (Lark) of a spec. `special_ids` maps `<TOOLCALL>`, `</TOOLCALL>`, `</think>`
    to token ids (the engine); without it the tokens are written as text (validation only)."""
    kind = spec.get("type")
    if kind == "json_object":
        body = f"%json {json.dumps(_with_options({'type': 'object'}, True))}"
    elif kind == "json_schema":
        strict = bool(spec.get("strict"))
        schema = spec.get("schema", {})
        if strict:
            check_keywords(schema)
        body = f"%json {json.dumps(_with_options(schema, strict))}"
    elif kind == "tool_calls":
        tools = spec.get("tools") or []
        if not tools:
            raise GrammarError("a tool-call constraint needs at least one tool.")
        schema, strict = _call_schema(tools)
        if strict:
            check_keywords(schema)
        more = ' ("," call)*' if spec.get("parallel") else ""
        body = (f'{_token(special_ids, TOOL_OPEN)} "[" call{more} "]" {_token(special_ids, TOOL_CLOSE)}\n'
                f"call: %json {json.dumps(_with_options(schema, strict))}")
    else:
        raise GrammarError(f"unknown structured-output type {kind!r} (use one of {', '.join(SPEC_TYPES)}).")
    if spec.get("reasoning"):
        return f"start: /(?s:.*)/ {_token(special_ids, THINK_CLOSE)} /[ \\n]*/ body\nbody: {body}\n"
    return f"start: {body}\n"


def _llg() -> Any:
    import llguidance

    return llguidance


def _grammar(spec: dict[str, Any], special_ids: dict[str, int] | None) -> str:
    llg = _llg()
    text = grammar_text(spec, special_ids)
    return llg.LLMatcher.grammar_from_lark(text)


_VALID_LOCK = threading.Lock()
_VALID: OrderedDict[str, str] = OrderedDict()  # spec key → "" (valid) or the error message


def validate_spec(spec: dict[str, Any]) -> None:
    """Raise GrammarError naming the problem when the engine could not compile `spec` (results cached)."""
    key = spec_key(spec)
    with _VALID_LOCK:
        known = _VALID.get(key)
        if known is not None:
            _VALID.move_to_end(key)
    if known is None:
        try:
            known = _llg().LLMatcher.validate_grammar(_grammar(spec, None))
        except GrammarError as e:
            known = e.message
        except ValueError as e:  # not a JSON object where one is needed
            known = str(e)
        with _VALID_LOCK:
            _VALID[key] = known
            while len(_VALID) > CACHE_SIZE:
                _VALID.popitem(last=False)
    if known:
        raise GrammarError(_short(known))


class Matcher:
    """The grammar state of one choice."""

    def __init__(self, inner: Any, vocab: int) -> None:
        self._m = inner
        self._vocab = vocab

    def allowed(self) -> Any:
        """bool torch mask [V] of the tokens the grammar allows next."""
        import torch

        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self._vocab].astype(bool))

    def consume(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise RuntimeError(f"the grammar rejected token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The output is complete: nothing but the end of sequence may follow."""
        return bool(self._m.is_stopped())

    def copy(self) -> Matcher:
        return Matcher(self._m.deep_copy(), self._vocab)


@dataclass(frozen=True)
class GrammarHandle:
    """A compiled spec: `matcher()` gives a fresh per-choice state (a copy of the compiled prototype)."""

    key: str
    prototype: Any
    vocab: int

    def matcher(self) -> Matcher:
        return Matcher(self.prototype.deep_copy(), self.vocab)


class GrammarCompiler:
    """Compiles specs for one tokenizer, caching the compiled grammar per spec (LRU)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int], special_ids: dict[str, int],
                 cache_size: int = CACHE_SIZE) -> None:
        llg = _llg()
        self.vocab = int(vocab_size)
        self._tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=self.vocab, eos_token=list(eos_ids))
        self.special_ids = {k: special_ids[k] for k in (TOOL_OPEN, TOOL_CLOSE, THINK_CLOSE) if k in special_ids}
        self._cache: OrderedDict[str, GrammarHandle] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_tokenizer(cls, bundle: Any, vocab_size: int, eos_ids: list[int]) -> GrammarCompiler:
        """From a `checkpoint.tokenizer.TokenizerBundle` (its `tokenizers.Tokenizer` and special ids)."""
        return cls(bundle.tokenizer.to_str(), vocab_size, eos_ids, dict(bundle.special))

    def compile(self, spec: dict[str, Any]) -> GrammarHandle:
        """The compiled grammar of `spec` (cached). Raises GrammarError when it cannot be compiled."""
        key = spec_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        if spec.get("type") == "tool_calls" or spec.get("reasoning"):
            missing = {TOOL_OPEN, TOOL_CLOSE} - set(self.special_ids) if spec.get("type") == "tool_calls" else set()
            if spec.get("reasoning") and THINK_CLOSE not in self.special_ids:
                missing.add(THINK_CLOSE)
            if missing:
                raise GrammarError(f"the tokenizer has no {', '.join(sorted(missing))} token.")
        m = _llg().LLMatcher(self._tokenizer, _grammar(spec, self.special_ids), log_level=0)
        if m.is_error():
            raise GrammarError(_short(m.get_error()))
        handle = GrammarHandle(key, m, self.vocab)
        with self._lock:
            self.misses += 1
            self._cache[key] = handle
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return handle
