"""W3C Trace Context: honour the client's `traceparent`, pass ours on to the engines.

    continue_trace(traceparent, tracestate) -> TraceContext

The gateway is one hop of the trace: it keeps the caller's trace id, makes a
span id of its own for the request, and sends `00-<trace id>-<our span id>-<flags>`
to the engine, so an engine that traces (vLLM with an OTLP endpoint) hangs its
spans under the gateway's. A missing or invalid `traceparent` starts a new
trace (sampled), as the spec says a participant should. Rules kept from the
spec: version `ff` is invalid; version 00 has exactly four fields; all-zero
trace or parent ids are invalid; a higher version may carry more fields after
the fourth, which are dropped. `tracestate` is passed on unchanged.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

_TP = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[0-9a-f].*)?$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_rand = random.Random()  # ids need uniqueness, not secrecy


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str  # 32 hex
    span_id: str  # 16 hex: the gateway's span for this request
    parent_id: str | None = None  # the caller's span, when it sent a valid traceparent
    flags: str = "01"
    tracestate: str | None = None
    span: Any = field(default=None, compare=False, repr=False)  # the OpenTelemetry span, if any

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def headers(self) -> tuple[tuple[str, str], ...]:
        h = (("traceparent", self.traceparent),)
        return h + ((("tracestate", self.tracestate),) if self.tracestate else ())


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent_id, flags) of a valid header, else None."""
    if not value:
        return None
    m = _TP.match(value.strip().lower())
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, flags


def new_span_id() -> str:
    while True:
        s = _rand.getrandbits(64)
        if s:
            return f"{s:016x}"


def new_trace_id() -> str:
    while True:
        t = _rand.getrandbits(128)
        if t:
            return f"{t:032x}"


def continue_trace(traceparent: str | None, tracestate: str | None = None) -> TraceContext:
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return TraceContext(new_trace_id(), new_span_id())
    trace_id, parent_id, flags = parsed
    state = tracestate if parsed and tracestate and len(tracestate) <= 512 else None
    return TraceContext(trace_id, new_span_id(), parent_id, flags, state)
