"""Structured output requests → a grammar spec (`nemovl_trt.model.grammar`), checked here with the same
grammar engine the cpu engine compiles with, so a schema that cannot be compiled is a 400
`invalid_json_schema` naming the problem before anything reaches Triton.

- `response_format: {"type": "json_object"}` → any JSON object;
- `response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` → that schema
  (strict: unknown keywords and keywords the engine does not implement are errors; otherwise ignored);
- `tool_choice: "required"` / a named function → a call of the allowed tool(s) in the model's
  `<TOOLCALL>[...]</TOOLCALL>` format (one call unless `parallel_tool_calls`).
"""

from __future__ import annotations

from typing import Any

from nemovl_trt.model.grammar import GrammarError, validate_spec
from nemovl_trt.server.errors import APIError, invalid

INVALID_JSON_SCHEMA = "invalid_json_schema"


def _checked(spec: dict[str, Any], param: str, what: str) -> dict[str, Any]:
    try:
        validate_spec(spec)
    except GrammarError as e:
        raise APIError(400, f"{what} cannot be used for constrained decoding: {e.message.rstrip('.')}.",
                       code=INVALID_JSON_SCHEMA, param=param) from None
    return spec


def response_format_spec(body: dict[str, Any]) -> dict[str, Any] | None:
    """The grammar spec of `response_format` (None for text / absent)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("'response_format.type' must be 'text', 'json_object' or 'json_schema'.", "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "json_object"}
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise invalid("'response_format.json_schema' must be an object with a 'schema'.",
                      "response_format.json_schema")
    schema = js.get("schema", {})
    if not isinstance(schema, dict | bool):
        raise invalid("'response_format.json_schema.schema' must be a JSON Schema object.",
                      "response_format.json_schema.schema")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("'response_format.json_schema.strict' must be a boolean.", "response_format.json_schema.strict")
    spec = {"type": "json_schema", "schema": schema, "strict": bool(strict)}
    return _checked(spec, "response_format.json_schema.schema", "The JSON schema")


def tool_call_spec(tools: list[dict[str, Any]], choice: Any, parallel: bool | None) -> dict[str, Any] | None:
    """The grammar spec that forces a tool call (tool_choice "required" or a named function), else None.
    `tools` is already narrowed to the named tool when one is named."""
    named = isinstance(choice, dict)
    if choice != "required" and not named:
        return None
    entries = [{"name": t["function"]["name"], "parameters": t["function"].get("parameters"),
                "strict": bool(t["function"].get("strict"))} for t in tools]
    spec = {"type": "tool_calls", "tools": entries, "parallel": bool(parallel is not False and not named)}
    return _checked(spec, "tools", "A tool's parameters schema")
