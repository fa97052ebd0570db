"""Structured logs: one JSON object per line, carrying the request being served.

    request_context(request_id=..., session_id=...)   set for the current task
    configure_logging("json" | "text")                 the `proxima` loggers' handler

The ingress sets the context at the start of each request (a contextvar, so
every log line written while serving it, in any module, carries its ids
without passing them around). Nothing here logs headers: API keys never reach
a log line, and a `Bearer <token>` that slips into a message is masked.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

_ctx: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("proxima_log_ctx", default=None)
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def request_context(**ids: str | None) -> contextvars.Token:
    """Set the ids (None values dropped) for log lines of the current task."""
    return _ctx.set({k: v for k, v in ids.items() if v is not None})


def current_context() -> dict[str, str]:
    return _ctx.get() or {}


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": redact(record.getMessage()),
        }
        out.update(current_context())
        for k, v in record.__dict__.items():  # `extra=` fields
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, separators=(",", ":"))


def configure_logging(fmt: str = "json", level: int = logging.INFO, stream=None) -> logging.Handler:
    """One handler on the `proxima` logger (replacing ours from an earlier call), on the
    process's own stderr: in a Serve replica `sys.stderr` is Serve's logger, whose buffer (1000
    records with the throughput settings) held a start-up warning out of sight for good."""
    logger = logging.getLogger("proxima")
    for h in list(logger.handlers):
        if getattr(h, "_proxima", False):
            logger.removeHandler(h)
    h = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
    h._proxima = True  # type: ignore[attr-defined]
    h.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
    return h
