"""Server-sent events framing, exactly as OpenAI and vLLM send it.

    data: {"id": ..., "object": "chat.completion.chunk", ...}\n\n
    ...
    data: [DONE]\n\n

JSON is compact (no spaces) and UTF-8 (non-ASCII is not escaped). An error
after the stream started cannot change the HTTP status any more, so it goes
out as one `data: {"error": {...}}` event followed by `[DONE]`, as vLLM does.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes, the same encoder as the events (for non-streamed bodies)."""
    return _dumps(obj).encode()
