"""Accounting for observability: one call per request feeds metrics, steps and spans.

    Observer.opened(stream)          first token: TTFT, predicted vs observed TTFT
    Observer.done(stream, ok)        accounted: E2E, TPOT, tokens, cache hits predicted and
                                     reported, retries/failovers, budget, the agent step, the span
    Observer.rejected(job, error)    refused before dispatch (budget 429, context length, ...)

Telemetry is the port to the fleet-wide store of steps and metric snapshots:
LocalTelemetry here (one process), serving.ray.telemetry over an actor. Its
`record_step` never waits: the Ray client batches.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from serving.errors import cancelled
from serving.ingress.metrics import Family, GatewayMetrics
from serving.observability.otel import NoTracer
from serving.observability.steps import STEP_HEADER, StepStore

if TYPE_CHECKING:
    from serving.ingress.pipeline import Job
    from serving.ingress.stream import Choices, Stream

access = logging.getLogger("proxima.access")


class Telemetry(Protocol):
    def seen_request(self) -> None: ...

    def record_step(self, tenant: str, session_id: str, record: dict[str, Any]) -> None: ...

    async def steps(self, tenant: str, session_id: str) -> dict[str, Any] | None: ...

    async def merged(self, own: list[Family]) -> tuple[list[list[Family]], int]: ...

    async def aclose(self, timeout_s: float) -> None: ...


class LocalTelemetry:
    """One process: the store is here, and this gateway is the whole fleet."""

    def __init__(self, max_sessions: int = 10_000, max_steps: int = 256):
        self.store = StepStore(max_sessions, max_steps)

    def seen_request(self) -> None:
        return None

    def record_step(self, tenant: str, session_id: str, record: dict[str, Any]) -> None:
        self.store.add(tenant, session_id, record)

    async def steps(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        return self.store.get(tenant, session_id)

    async def merged(self, own: list[Family]) -> tuple[list[list[Family]], int]:
        return [own], 1

    async def aclose(self, timeout_s: float) -> None:
        return None  # the store lives and dies with this process: nothing to hand over


class Observer:
    def __init__(self, metrics: GatewayMetrics, telemetry: Telemetry, tracer: Any = None,
                 access_log: bool = False):
        self.m, self.telemetry = metrics, telemetry
        self.tracer = tracer or NoTracer()
        self.access_log = access_log
        self._spans = not isinstance(self.tracer, NoTracer)
        # children per label tuple (bounded: regions, models and tenants come from the config);
        # .labels() costs a few microseconds each, a dict hit a fraction of one
        self._open: dict[tuple[str, str, str], tuple] = {}
        self._done: dict[tuple[str, str, str], tuple] = {}

    def _open_children(self, region: str, model: str, tenant: str) -> tuple:
        m = self.m
        return (m.ttft.labels(region, model, tenant), m.predicted.labels(region, model),
                m.observed.labels(region, model), m.prediction_error.labels(region, model))

    def _done_children(self, region: str, model: str, tenant: str) -> tuple:
        m = self.m
        return (m.e2e.labels(region, model, tenant), m.tpot.labels(region, model, tenant),
                m.prompt_tokens.labels(region, model, tenant), m.completion_tokens.labels(region, model, tenant),
                m.cached_tokens.labels(region, model, "engine"), m.cached_tokens.labels(region, model, "predicted"))

    def opened(self, s: "Stream") -> None:
        d = s.decision
        if d is None or s.ttft_s is None:
            return
        key = (d.region, s.job.model, s.job.principal.tenant)
        ch = self._open.get(key)
        if ch is None:
            ch = self._open[key] = self._open_children(*key)
        ttft, predicted, observed, error = ch
        ttft.observe(s.ttft_s)
        pred = d.predicted_ttft_ms / 1000.0
        predicted.observe(pred)
        if s.routed_ttft_s is not None:
            observed.observe(s.routed_ttft_s)
            error.observe(s.routed_ttft_s - pred)

    def done(self, s: "Stream", ok: bool) -> None:
        job, d, m = s.job, s.decision, self.m
        self.telemetry.seen_request()
        tenant, model = job.principal.tenant, job.model
        region = d.region if d is not None else ""
        e2e = time.perf_counter() - s.t0
        if d is not None:
            key = (region, model, tenant)
            ch = self._done.get(key)
            if ch is None:
                ch = self._done[key] = self._done_children(*key)
            e2e_h, tpot_h, prompt_c, completion_c, cached_engine, cached_predicted = ch
            e2e_h.observe(e2e)
            if s.ttft_s is not None and s.completion_tokens > 1:
                tpot_h.observe((e2e - s.ttft_s) / (s.completion_tokens - 1))
            prompt_c.inc(s.prompt_tokens)
            completion_c.inc(s.completion_tokens)
            cached_engine.inc(s.cached_tokens)
            cached_predicted.inc(d.cached_tokens)
        attempts = s.trace.attempts
        for i, (_, from_region, sent, outcome) in enumerate(attempts[:-1]):
            if outcome != "failed":
                continue
            m.retries.labels(model, "continuation" if sent else "retry").inc()
            to_region = attempts[i + 1][1]
            if to_region != from_region:
                m.failovers.labels(from_region, to_region).inc()
        err = None if ok else _error_type(s.error)
        s.client_left = err == "client_disconnected"
        if s.group is not None:
            # a choice of n: what it is billed is known once every choice has closed (another's
            # failure bills the request nothing): its charge and record wait for choices_done
            s.group.closed.append((s, e2e, err))
            return
        if s.client_left:
            m.disconnects.labels(region, model, tenant).inc()
        self._charged(s, e2e, err)

    def _charged(self, s: "Stream", e2e: float, err: str | None) -> None:
        """The stream's charge (budget metric) and its step record, its outcome known."""
        job, tenant, charged = s.job, s.job.principal.tenant, s.charged
        if charged:
            self.m.budget_charged.labels(tenant).inc(charged)
        if job.session_id is None and not self._spans and not self.access_log:
            return  # nobody reads a record: don't build one
        record = step_record(job, s, e2e, charged, err)
        if job.session_id is not None:
            self.telemetry.record_step(tenant, job.session_id, record)
        if self._spans and s.group is None:  # choices of n: one span, ended by `choices_done`
            self.tracer.end(job.trace, _span_attributes(record), err)
        if self.access_log:
            access.info("request done", extra={"summary": record})

    def choices_done(self, c: "Choices") -> None:
        """Every choice of a request for n > 1 is closed: the request's one span, with the
        whole request's tokens and each choice's finish_reason. A client that left before every
        answer was whole is counted once, here."""
        for s, e2e, err in c.closed:
            self._charged(s, e2e, err)
        first = c.streams[0]
        failed = any(s.error is not None and not cancelled(s.error)
                     for s in c.streams)  # then the others were closed for it, not by the client
        if not failed and any(s.client_left for s in c.streams):
            d = first.decision
            self.m.disconnects.labels(d.region if d is not None else "", c.job.model,
                                      c.job.principal.tenant).inc()
        if not self._spans:
            return
        failed = next((s.error for s in c.streams if s.error is not None), None)
        err = None if failed is None else _error_type(failed)
        charged = sum(s.charged for s in c.streams)
        attrs = _span_attributes(step_record(c.job, first, time.perf_counter() - first.t0, charged, err))
        attrs["gen_ai.usage.output_tokens"] = c.completion_tokens
        attrs["gen_ai.response.finish_reasons"] = [s.answer_finish_reason or "" for s in c.streams]
        attrs["proxima.tool_calls"] = [n for s in c.streams if s.reader is not None for n in s.reader.tool_names]
        self.tracer.end(c.job.trace, attrs, err)

    def rejected(self, job: "Job", error: BaseException) -> None:
        err = _error_type(error)
        record = step_record(job, None, None, 0, err)
        if job.session_id is not None:
            self.telemetry.record_step(job.principal.tenant, job.session_id, record)
        self.tracer.end(job.trace, _span_attributes(record), err)
        if self.access_log:
            access.info("request refused", extra={"summary": record})


def _error_type(e: BaseException | None) -> str:
    if e is None or cancelled(e):
        return "client_disconnected"
    return getattr(e, "code", None) or getattr(e, "type", None) or type(e).__name__


def step_record(job: "Job", s: "Stream | None", e2e_s: float | None, charged: int,
                error: str | None) -> dict[str, Any]:
    """The agent step as JSON: the routing decision and why, tokens, cache, queue, budget."""
    h = dict(job.headers)
    d = s.decision if s is not None else None
    t = job.trace
    rec: dict[str, Any] = {
        "request_id": h.get("x-request-id", job.request_id), "id": job.request_id,
        "step": h.get(STEP_HEADER), "session_id": job.session_id, "tenant": job.principal.tenant,
        "trace_id": t.trace_id if t else None, "span_id": t.span_id if t else None,
        "parent_span_id": t.parent_id if t else None,
        "started_at": round(job.created, 3), "kind": job.parsed.kind, "model": job.model, "requested_model": job.parsed.model,
        "tier": dict(job.reply_headers).get("x-proxima-tier"), "client_region": job.client_region,
        "status": "ok" if error is None else "error", "error": error,
        "routing": None, "cached_tokens": 0, "queue_wait_ms": None,
        "prompt_tokens": job.prompt_tokens, "completion_tokens": 0, "budget_charged_tokens": charged,
        "ttft_ms": None, "e2e_ms": None, "finish_reason": None, "tool_calls": [], "attempts": [],
    }
    if job.parsed.n > 1:  # one record per choice, each its own engine request
        rec["choice"] = job.choice
    if s is not None:
        rec.update(prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                   cached_tokens=s.cached_tokens,
                   finish_reason=s.answer_finish_reason,  # what the client got: "tool_calls", not "stop"
                   tool_calls=[] if s.reader is None else list(s.reader.tool_names),
                   ttft_ms=_ms(s.ttft_s), e2e_ms=_ms(e2e_s), engine_ttft_ms=_ms(s.engine_ttft_s),
                   attempts=[{"replica": r, "region": g, "tokens_sent": n, "outcome": o}
                             for r, g, n, o in s.trace.attempts])
    if d is not None:
        p = d.predicted
        rec["queue_wait_ms"] = round(p.queue_ms, 3)
        rec["routing"] = {
            "policy": d.policy, "region": d.region, "replica": d.replica_id, "reason": d.reason,
            "candidates": d.candidates, "predicted_ttft_ms": round(d.predicted_ttft_ms, 3),
            "predicted": {"rtt_ms": round(p.rtt_ms, 3), "queue_ms": round(p.queue_ms, 3),
                          "prefill_ms": round(p.prefill_ms, 3)},
            "predicted_cached_tokens": d.cached_tokens}
    return rec


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000.0, 3)


def _span_attributes(r: dict[str, Any]) -> dict[str, Any]:
    routing = r.get("routing") or {}
    return {
        "gen_ai.operation.name": "chat" if r["kind"] == "chat" else "text_completion",
        "gen_ai.request.model": r["requested_model"],
        "gen_ai.response.model": r["model"], "gen_ai.usage.input_tokens": r["prompt_tokens"],
        "gen_ai.usage.output_tokens": r["completion_tokens"], "session.id": r["session_id"],
        "proxima.agent_step": r["step"], "proxima.tenant": r["tenant"], "proxima.request_id": r["request_id"],
        "proxima.region": routing.get("region"), "proxima.replica": routing.get("replica"),
        "proxima.routing.policy": routing.get("policy"), "proxima.routing.reason": routing.get("reason"),
        "proxima.predicted_ttft_ms": routing.get("predicted_ttft_ms"),
        "proxima.cached_tokens": r["cached_tokens"], "proxima.queue_wait_ms": r["queue_wait_ms"],
        "proxima.ttft_ms": r.get("ttft_ms"), "proxima.budget_charged_tokens": r["budget_charged_tokens"],
        "gen_ai.response.finish_reasons": [r["finish_reason"]] if r["finish_reason"] else [],
        "proxima.tool_calls": r["tool_calls"],
    }
