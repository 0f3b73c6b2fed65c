"""The OpenAPI 3.0 document of the HTTP API (docs/api.md), served by the edge at `GET /openapi.json`.

It states what clients may send and what every answer looks like; the fuzz tests (tests/test_fuzz_*.py,
`make fuzz`) generate requests from it with schemathesis and check each response against it. The request
schema is deliberately permissive where the server is (unknown fields are ignored, as NIM does) and names
the documented ranges, so schema-valid requests exercise generation and schema-invalid ones the 400 paths.
"""

from __future__ import annotations

from typing import Any

from nemovl_trt.server.completions_schema import MAX_PROMPTS
from nemovl_trt.server.sampling_schema import MAX_N
from nemovl_trt.serving.guards import INT64_MAX, INT64_MIN

# A token-id prompt in the document: ids inside the tiny test vocabulary and a short list, so schema-valid
# requests generate rather than all being refused for an unknown id or an over-long prompt.
FUZZ_TOKEN_ID_MAX = 1000
FUZZ_ID_PROMPT_MAX = 64

ERROR = {"$ref": "#/components/schemas/Error"}
# One server-sent event: `data:` carries a chunk's JSON, an `{"error": ...}` object, or `[DONE]`.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "minLength": 1}, "event": {"type": "string"}}}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": ERROR}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {400: "invalid request", 401: "missing or wrong API key", 404: "not found", 405: "method not allowed",
             413: "body too large", 429: "over capacity (Retry-After)", 500: "server bug (request id in message)",
             503: "model not ready (Retry-After)", 504: "request timeout"}
    return {str(c): _err(names[c]) for c in codes}


def openapi_document(model_name: str = "nvidia/nemotron-nano-12b-v2-vl", max_seq_len: int | None = None,
                     max_num_tiles: int = 12, max_video_frames: int = 128) -> dict[str, Any]:
    """The document for a server serving `model_name` with these limits."""
    max_tokens: dict[str, Any] = {"type": "integer", "minimum": 1}
    if max_seq_len:
        max_tokens["maximum"] = max_seq_len - 1
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    url_obj = {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}
    image_part = {"type": "object", "required": ["type", "image_url"],
                  "properties": {"type": {"type": "string", "enum": ["image_url"]}, "image_url": url_obj}}
    video_part = {"type": "object", "required": ["type", "video_url"],
                  "properties": {"type": {"type": "string", "enum": ["video_url"]}, "video_url": url_obj}}
    content = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [text_part, image_part,
                                                                                     video_part]}}]}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"type": "string", "enum": ["system", "developer", "user", "assistant",
                                                                  "tool"]},
                              "content": content, "name": {"type": "string"},
                              "tool_call_id": {"type": "string"}}}
    tool = {"type": "object", "required": ["type", "function"],
            "properties": {"type": {"type": "string", "enum": ["function"]},
                           "function": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string",
                                                                "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                                                       "description": {"type": "string"},
                                                       "parameters": {"type": "object"}}}}}
    request = {
        "type": "object", "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "enum": [model_name]},
            "messages": {"type": "array", "minItems": 1, "items": message},
            "max_tokens": max_tokens, "max_completion_tokens": max_tokens,
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
            "top_k": {"type": "integer", "minimum": -1, "maximum": 2 ** 31 - 1},
            "seed": {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
            "stop": {"oneOf": [{"type": "string", "minLength": 1},
                               {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}}]},
            "stream": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 1, "maximum": 2 ** 31 - 1},
            "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
            "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
            "ignore_eos": {"type": "boolean"},
            "tools": {"type": "array", "minItems": 1, "items": tool},
            "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}]},
            "mm_processor_kwargs": {"type": "object", "additionalProperties": False, "properties": {
                "max_num_tiles": {"type": "integer", "minimum": 1, "maximum": max_num_tiles}}},
            "media_io_kwargs": {"type": "object", "additionalProperties": False, "properties": {
                "video": {"type": "object", "additionalProperties": False, "properties": {
                    "num_frames": {"type": "integer", "minimum": 1, "maximum": max_video_frames}}}}},
            "video_pruning_rate": {"type": "number", "minimum": 0, "maximum": 0.99},
            "user": {"type": "string"},
        },
    }
    sampling = {k: request["properties"][k] for k in ("max_tokens", "temperature", "top_p", "top_k", "seed",
                                                      "stop", "stream", "n", "ignore_eos", "user")}
    # /v1/completions `prompt`: one prompt (text or token ids) or a list of up to MAX_PROMPTS of them, each its
    # own engine request (prompts x max(n, best_of) over MAX_CHOICES is a 400, which the document lists)
    text_prompt = {"type": "string", "minLength": 1}
    id_prompt = {"type": "array", "minItems": 1, "maxItems": FUZZ_ID_PROMPT_MAX,
                 "items": {"type": "integer", "minimum": 0, "maximum": FUZZ_TOKEN_ID_MAX}}
    completion_request = {
        "type": "object", "required": ["model", "prompt"],
        "properties": {"model": request["properties"]["model"],
                       "prompt": {"oneOf": [text_prompt, id_prompt,
                                            {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
                                             "items": {"oneOf": [text_prompt, id_prompt]}}]},
                       "best_of": {"type": "integer", "minimum": 1, "maximum": MAX_N},
                       "echo": {"type": "boolean"}, **sampling},
    }
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer", "minimum": 0}
                            for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    completion = {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
            "created": {"type": "integer"}, "model": {"type": "string", "enum": [model_name]},
            "choices": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {"index": {"type": "integer"},
                               "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls",
                                                                            "cancelled"]},
                               "message": {"type": "object", "required": ["role"], "properties": {
                                   "role": {"type": "string", "enum": ["assistant"]},
                                   "content": {"type": "string", "nullable": True},
                                   "reasoning_content": {"type": "string", "nullable": True},
                                   "tool_calls": {"type": "array"}}}}}},
            "usage": usage,
        },
    }
    text_completion = {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
            "created": {"type": "integer"}, "model": {"type": "string", "enum": [model_name]},
            "choices": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["index", "text", "finish_reason"],
                "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                               "finish_reason": {"type": "string", "enum": ["stop", "length", "cancelled"]}}}},
            "usage": usage,
        },
    }
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": "string", "nullable": True},
                       "code": {"type": "string", "nullable": True}}}}}
    health = {"type": "object", "required": ["object", "message", "status"],
              "properties": {"object": {"type": "string"}, "message": {"type": "string"},
                             "status": {"type": "string"}}}
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"],
             "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                            "created": {"type": "integer"}, "owned_by": {"type": "string"},
                            "max_model_len": {"type": "integer", "nullable": True}}}
    security = [{"bearer": []}]
    return {
        "openapi": "3.0.3",
        "info": {"title": "nemovl OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion", "security": security,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {"200": {"description": "a completion (JSON), or an SSE stream when stream is true",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/ChatCompletion"}},
                                          "text/event-stream": {"schema": SSE_EVENT}}},
                              **_errors(400, 401, 404, 413, 429, 500, 503, 504)}}},
            "/v1/completions": {"post": {
                "operationId": "createCompletion", "security": security,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/CompletionRequest"}}}},
                "responses": {"200": {"description": "a completion (JSON), or an SSE stream when stream is true",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/TextCompletion"}},
                                          "text/event-stream": {"schema": SSE_EVENT}}},
                              **_errors(400, 401, 404, 413, 429, 500, 503, 504)}}},
            "/v1/models": {"get": {"operationId": "listModels", "security": security, "responses": {
                "200": {"description": "the served model", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["object", "data"],
                    "properties": {"object": {"type": "string", "enum": ["list"]},
                                   "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}}}},
                **_errors(401)}}},
            "/v1/models/{model_id}": {"get": {
                "operationId": "getModel", "security": security,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the model", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Model"}}}}, **_errors(401, 404)}}},
            "/v1/health/ready": {"get": {"operationId": "ready", "responses": {
                "200": {"description": "ready", "content": {"application/json": {"schema": health}}},
                **_errors(503)}}},
            "/v1/health/live": {"get": {"operationId": "live", "responses": {
                "200": {"description": "live", "content": {"application/json": {"schema": health}}}}}},
            "/health": {"get": {"operationId": "health", "responses": {
                "200": {"description": "ready", "content": {"application/json": {"schema": health}}},
                **_errors(503)}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"ChatCompletionRequest": request, "ChatCompletion": completion, "Error": error,
                        "Model": model, "CompletionRequest": completion_request, "TextCompletion": text_completion},
        },
    }
