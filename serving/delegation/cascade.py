"""Cascade checks: does the small tier's answer pass, or must the large tier redo it?

    json_object  -> the text parses as a JSON object
    json_schema  -> ... and holds the schema's top-level `required` keys
    anything else passes

Cheap, local checks only; the cascade runs on non-streamed answers (a streamed
answer can't be taken back once the client has it).
"""

from __future__ import annotations

import json
from typing import Any


def is_json_format(response_format: Any) -> bool:
    return isinstance(response_format, dict) and response_format.get("type") in (
        "json_object", "json_schema")


def passes_check(response_format: Any, text: str) -> bool:
    if not is_json_format(response_format):
        return True
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return False
    if not isinstance(value, dict):
        return False
    if response_format["type"] == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return all(k in value for k in schema.get("required", ()))
    return True

