"""Observability: fleet-wide metrics, agent-step records, W3C trace context, JSON logs.

    tracing    traceparent in -> TraceContext (ours) -> headers to the engines
    steps      StepRecord per request of an agent session; StepStore (bounded, per tenant)
    observer   the accounting hook: one call per finished request feeds metrics, steps, spans
    fleet      merge of every ingress replica's metrics + the router's fleet gauges
    logs       JSON log lines carrying the request id
    otel       optional OpenTelemetry spans to an OTLP endpoint (the `otel` extra)
"""
