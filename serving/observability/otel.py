"""Request spans: W3C ids always, OpenTelemetry spans to OTLP when configured.

    make_tracer(observability_config) -> NoTracer | OtelTracer
    tracer.start(traceparent, tracestate) -> TraceContext   (at prepare)
    tracer.end(ctx, attributes, error_type)                  (at accounting)

NoTracer only makes the ids (serving.observability.tracing). OtelTracer (the
optional `otel` extra: opentelemetry-sdk and the OTLP/HTTP exporter) opens one
SERVER span per request under the caller's traceparent, so the ids the engines
receive are the span's own, and exports it in batches off the request path.
The span carries GenAI semantic-convention attributes (gen_ai.request.model,
gen_ai.usage.input_tokens, ...) and Proxima's routing decision.
"""

from __future__ import annotations

from typing import Any

from serving.config import ConfigError
from serving.observability.tracing import TraceContext, continue_trace, parse_traceparent


class NoTracer:
    def start(self, traceparent: str | None, tracestate: str | None = None) -> TraceContext:
        return continue_trace(traceparent, tracestate)

    def end(self, ctx: TraceContext | None, attributes: dict[str, Any], error: str | None = None) -> None:
        return None


class OtelTracer:
    def __init__(self, endpoint: str | None, service_name: str = "proxima-gateway", exporter: Any = None):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        else:  # a given exporter (tests, embedders) gets each span as it ends
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("proxima")
        self.propagator = TraceContextTextMapPropagator()

    def start(self, traceparent: str | None, tracestate: str | None = None) -> TraceContext:
        from opentelemetry.trace import SpanKind

        carrier = {k: v for k, v in (("traceparent", traceparent), ("tracestate", tracestate)) if v}
        span = self.tracer.start_span("proxima.request", context=self.propagator.extract(carrier),
                                      kind=SpanKind.SERVER)
        sc = span.get_span_context()
        parent = parse_traceparent(traceparent)
        return TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", parent[1] if parent else None,
                            f"{int(sc.trace_flags):02x}", tracestate if parent else None, span)

    def end(self, ctx: TraceContext | None, attributes: dict[str, Any], error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = ctx.span if ctx is not None else None
        if span is None or not span.is_recording():  # not sampled, or already ended (cascade redo)
            return
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()


def make_tracer(obs: Any) -> NoTracer | OtelTracer:
    if obs is None or not obs.otlp_endpoint:
        return NoTracer()
    try:
        return OtelTracer(obs.otlp_endpoint, obs.service_name)
    except ImportError as e:
        raise ConfigError(f"observability.otlp_endpoint: needs the `otel` extra "
                          f"(pip install 'proxima[otel]'): {e}") from None
