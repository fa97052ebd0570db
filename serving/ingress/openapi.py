"""The gateway's OpenAPI 3.1 document: GET /openapi.json.

    openapi_schema(model_names, regions) -> dict

Request bodies come from the very pydantic models that validate them
(serving.ingress.openai_api), so the document cannot drift from what the
gateway accepts; responses name every status a client should expect, each
error with the OpenAI error body. The fuzz drill (tests/integration/test_fuzz.py)
generates requests from this document, valid and invalid, for every endpoint.
"""

from __future__ import annotations

from typing import Any

from serving.ingress.openai_api import ChatRequest, CompletionRequest, DetokenizeRequest

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_REASONS = {400: "Invalid request (bad JSON, wrong field, context length exceeded, unknown client region)",
            401: "Missing or invalid API key", 403: "Not allowed for this key",
            404: "Unknown model or path", 405: "Method not allowed",
            413: "Request body larger than serve.max_request_bytes",
            429: "Token budget or rate limit exceeded (Retry-After)",
            502: "Every replica tried failed", 503: "No replica available (or none in the allowed regions)",
            504: "A replica stalled"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _REASONS[c], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for c in codes}


def _json(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _header(name: str, desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": desc,
            "schema": schema or {"type": "string"}}


def openapi_schema(model_names: list[str], regions: list[str]) -> dict[str, Any]:
    defs: dict[str, Any] = {"Error": _ERROR}
    bodies = {}
    for name, cls in (("ChatCompletionRequest", ChatRequest), ("CompletionRequest", CompletionRequest),
                      ("DetokenizeRequest", DetokenizeRequest)):
        s = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(s.pop("$defs", {}))
        s["properties"]["model"]["examples"] = model_names
        defs[name] = s
        bodies[name] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"}}}}
    strs = {"type": "object", "properties": {"return_token_strs": {"type": "boolean"}}}
    bodies["TokenizeRequest"] = {"required": True, "content": {"application/json": {"schema": {"anyOf": [
        {"allOf": [{"$ref": f"#/components/schemas/{n}"}, strs]}
        for n in ("ChatCompletionRequest", "CompletionRequest")]}}}}
    request_headers = [
        _header("x-client-region", "The client's region (default: the gateway's home region)",
                {"type": "string", "examples": regions}),
        _header("x-request-id", "Echoed back; 1-128 of [A-Za-z0-9._:-]"),
        _header("x-session-id", "Agent session"), _header("x-agent-step", "Step within the session"),
        _header("traceparent", "W3C trace context"),
        _header("x-proxima-regions", "Comma-separated regions this request may use (only narrows)"),
        _header("x-proxima-slo-ttft-ms", "The caller's TTFT target (delegation of `auto`)"),
    ]
    completion_ok = {"description": "The completion; an SSE stream of chunks when `stream` is true",
                     "content": {"application/json": {"schema": {"type": "object"}},
                                 "text/event-stream": {"schema": {"type": "string"}}}}

    def generate(summary: str, body: str) -> dict[str, Any]:
        return {"post": {"summary": summary, "parameters": request_headers, "requestBody": bodies[body],
                         "responses": {"200": completion_ok,
                                       **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504)}}}

    def post(summary: str, body: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
        return {"post": {"summary": summary, "requestBody": bodies[body],
                         "responses": {"200": ok, **_errors(*errors)}}}

    def get(summary: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "Proxima gateway", "version": "0.1.0",
                 "description": "OpenAI-compatible, latency-aware inference router."},
        "paths": {
            "/v1/chat/completions": generate("Chat completion", "ChatCompletionRequest"),
            "/v1/completions": generate("Text completion", "CompletionRequest"),
            "/v1/models": get("Models served (and aliases)", _json("Model list"), 401),
            "/v1/models/{model}": {"get": {
                "summary": "One model (or alias)",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json("Model"), **_errors(401, 404)}}},
            "/v1/budgets": get("The caller's token budgets", _json("Budgets"), 401, 404),
            "/tokenize": post("A prompt's tokens as the model gets them (vLLM's; chat or completion body)",
                              "TokenizeRequest", _json("count, max_model_len, tokens, token_strs"),
                              400, 401, 404, 413),
            "/detokenize": post("The text of tokens (vLLM's)", "DetokenizeRequest", _json("prompt"), 400, 401, 404, 413),
            "/health": get("Replicas up", _json("Healthy"), 503),
            "/metrics": get("Prometheus metrics", {"description": "Prometheus text",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}),
            "/v1/sessions/{session_id}/steps": {"get": {
                "summary": "The caller's agent session: one record per step",
                "parameters": [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json("Step records"), **_errors(401, 404)}}},
            "/admin/router": get("The router's view of every replica", _json("Router state"), 401, 403),
            "/openapi.json": get("This document", _json("OpenAPI 3.1")),
        },
        "components": {
            "schemas": defs,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"apiKey": []}],  # open gateways take no key
    }
