"""W3C traceparent: continued by the gateway, carried to the engines; OTel spans; JSON logs."""

import io
import sys
import json
import logging

import pytest

from obs_helpers import ACME, build, chat
from serving.observability.logs import JsonFormatter, configure_logging, request_context
from serving.observability.tracing import continue_trace, parse_traceparent

CHAT = "/v1/chat/completions"
TRACE, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TP = f"00-{TRACE}-{PARENT}-01"


@pytest.mark.parametrize("header,ok", [
    pytest.param(TP, True, id="valid"),
    pytest.param(TP.upper(), True, id="uppercase-tolerated"),
    pytest.param(f"01-{TRACE}-{PARENT}-01-extra", True, id="future-version-extra-field"),
    pytest.param(f"00-{TRACE}-{PARENT}-01-extra", False, id="v00-extra-field"),
    pytest.param(f"ff-{TRACE}-{PARENT}-01", False, id="version-ff"),
    pytest.param(f"00-{'0' * 32}-{PARENT}-01", False, id="zero-trace-id"),
    pytest.param(f"00-{TRACE}-{'0' * 16}-01", False, id="zero-parent-id"),
    pytest.param(f"00-{TRACE[:-1]}-{PARENT}-01", False, id="short-trace-id"),
    pytest.param("garbage", False, id="garbage"),
    pytest.param(None, False, id="missing"),
])
def test_traceparent_parsing_follows_the_spec(header, ok):
    assert (parse_traceparent(header) is not None) is ok


def test_a_valid_parent_is_continued_and_an_invalid_one_restarts_the_trace():
    t = continue_trace(TP, "vendor=1")
    assert (t.trace_id, t.parent_id, t.flags, t.tracestate) == (TRACE, PARENT, "01", "vendor=1")
    assert t.span_id != PARENT and len(t.span_id) == 16
    assert t.traceparent == f"00-{TRACE}-{t.span_id}-01"
    fresh = continue_trace("00-bad", "vendor=1")
    assert fresh.trace_id != TRACE and fresh.parent_id is None and fresh.tracestate is None


async def test_the_engine_receives_the_gateways_span_under_the_callers_trace():
    c, engines, _ = build()
    h = {**ACME, "traceparent": TP, "tracestate": "congo=t61", "x-session-id": "s1", "x-agent-step": "7"}
    r = await c.post(CHAT, json=chat(), headers=h)
    gen = engines[r.headers["x-proxima-replica"]].requests[-1]
    th = dict(gen.trace_headers)
    step = (await c.get("/v1/sessions/s1/steps", headers=ACME)).json()["data"][0]
    assert th["traceparent"] == f"00-{TRACE}-{step['span_id']}-01"
    assert (step["trace_id"], step["parent_span_id"]) == (TRACE, PARENT)
    assert (th["tracestate"], th["x-session-id"], th["x-agent-step"]) == ("congo=t61", "s1", "7")


async def test_retries_carry_the_same_trace_context():
    from obs_helpers import FrozenRouter
    c, engines, _ = build(router_cls=FrozenRouter)
    engines["us-0"].kill()
    r = await c.post(CHAT, json=chat(), headers={**ACME, "traceparent": TP})
    assert r.status_code == 200
    sent = [dict(g.trace_headers)["traceparent"] for e in engines.values() for g in e.requests]
    assert len(sent) == 2 and len(set(sent)) == 1 and TRACE in sent[0]


async def test_without_a_traceparent_each_request_starts_its_own_trace():
    c, engines, _ = build()
    for _ in range(2):
        await c.post(CHAT, json=chat(), headers=ACME)
    sent = [parse_traceparent(dict(g.trace_headers)["traceparent"]) for e in engines.values()
            for g in e.requests]
    assert len(sent) == 2 and sent[0][0] != sent[1][0]


async def test_vllm_http_forwards_the_trace_headers():
    from aiohttp import web

    from serving.engines.base import GenerateRequest
    from serving.engines.vllm_http import VLLMHttpEngine

    seen = []

    async def completions(request):
        seen.append(dict(request.headers))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for data in ({"choices": [{"text": "x", "token_ids": [1], "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
                     {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}):
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def metrics(request):
        return web.Response(text="vllm:num_requests_running 0\n")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    e = VLLMHttpEngine("r1", f"http://127.0.0.1:{port}", model="tiny", poll_interval_s=3600)
    try:
        await e.start()
        gen = GenerateRequest("q1", (5, 6), max_tokens=1,
                              trace_headers=(("traceparent", TP), ("x-session-id", "s1")))
        [c async for c in e.generate(gen)]
    finally:
        await e.close()
        await runner.cleanup()
    assert seen[0]["traceparent"] == TP and seen[0]["x-session-id"] == "s1"


async def test_otel_spans_hang_under_the_callers_trace_with_the_routing_decision():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving.observability.otel import OtelTracer

    mem = InMemorySpanExporter()
    c, engines, _ = build(tracer=OtelTracer(None, exporter=mem))
    r = await c.post(CHAT, json=chat(), headers={**ACME, "traceparent": TP, "x-session-id": "s1"})
    (span,) = mem.get_finished_spans()
    ctx = span.get_span_context()
    assert f"{ctx.trace_id:032x}" == TRACE and f"{span.parent.span_id:016x}" == PARENT
    sent = dict(engines[r.headers["x-proxima-replica"]].requests[-1].trace_headers)["traceparent"]
    assert sent == f"00-{TRACE}-{ctx.span_id:016x}-01"
    a = span.attributes
    assert (a["gen_ai.request.model"], a["proxima.replica"], a["session.id"], a["proxima.tenant"]) == \
        ("m", r.headers["x-proxima-replica"], "s1", "acme")
    assert a["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    assert "predicted TTFT" in a["proxima.routing.reason"]
    bad = await c.post(CHAT, json=chat(max_tokens=5000), headers=ACME)
    assert bad.status_code == 400
    err = mem.get_finished_spans()[-1]
    assert err.status.status_code.name == "ERROR" and err.status.description == "context_length_exceeded"


def test_otel_exports_spans_to_a_real_otlp_http_endpoint():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from serving.observability.otel import OtelTracer

    got = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t = OtelTracer(f"http://127.0.0.1:{srv.server_port}/v1/traces", "proxima-test")
        ctx = t.start(TP)
        t.end(ctx, {"proxima.region": "us"})
        t.shutdown()  # flushes the batch
    finally:
        srv.shutdown()
    path, body = got[0]
    req = ExportTraceServiceRequest.FromString(body)
    span = req.resource_spans[0].scope_spans[0].spans[0]
    assert path == "/v1/traces" and span.trace_id.hex() == TRACE and span.parent_span_id.hex() == PARENT


def test_otlp_endpoint_without_the_extra_names_the_key(monkeypatch):
    import builtins

    from serving.config import ConfigError, load_config
    from serving.observability.otel import make_tracer

    real = builtins.__import__

    def no_otel(name, *a, **kw):
        if name.startswith("opentelemetry"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    obs = load_config({"home_region": "us", "models": [{"name": "m"}], "regions": {"us": {"replicas": 1}},
                       "observability": {"otlp_endpoint": "http://collector:4318/v1/traces"}}).observability
    with pytest.raises(ConfigError, match="observability.otlp_endpoint"):
        make_tracer(obs)


def test_json_log_lines_carry_the_request_id_and_never_a_key():
    out = io.StringIO()
    h = configure_logging("json", stream=out)
    try:
        request_context(request_id="req-42", session_id="s1")
        logging.getLogger("proxima.test").warning("upstream said Authorization: Bearer sk-secret-1")
    finally:
        logging.getLogger("proxima").removeHandler(h)
        logging.getLogger("proxima").propagate = True
        request_context()
    line = json.loads(out.getvalue())
    assert (line["request_id"], line["session_id"], line["level"], line["logger"]) == \
        ("req-42", "s1", "WARNING", "proxima.test")
    assert "sk-secret-1" not in out.getvalue() and "[redacted]" in line["msg"]


async def test_access_log_line_per_request_carries_the_clients_request_id():
    cfg = __import__("obs_helpers").CONFIG
    c, _, _ = build({**cfg, "observability": {"access_log": True}})
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.setFormatter(JsonFormatter())
    log = logging.getLogger("proxima.access")
    log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        r = await c.post(CHAT, json=chat(), headers={**ACME, "x-request-id": "client-7"})
        # refused by its budget (globex has 30 tokens a day): a line too, with the error
        refused = await c.post(CHAT, json=chat(max_tokens=100), headers={"authorization": "Bearer key-globex"})
    finally:
        log.removeHandler(h)
    done, no = [json.loads(x) for x in out.getvalue().splitlines()[-2:]]
    assert done["request_id"] == "client-7" == r.headers["x-request-id"] and done["msg"] == "request done"
    assert done["summary"]["routing"]["replica"] == r.headers["x-proxima-replica"]
    assert refused.status_code == 429 and no["msg"] == "request refused"
    assert no["summary"]["error"] == "budget_exceeded" and no["summary"]["tenant"] == "globex"
    assert "key-acme" not in out.getvalue() and "key-globex" not in out.getvalue()


async def test_a_request_for_n_choices_is_one_span_with_all_its_tokens():
    """Found by a review: each choice ended the one span, the first with its own tokens only."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving.observability.otel import OtelTracer

    mem = InMemorySpanExporter()
    c, _, _ = build(tracer=OtelTracer(None, exporter=mem))
    r = await c.post(CHAT, json=chat(n=3, max_tokens=4), headers=ACME)
    assert r.status_code == 200
    (span,) = mem.get_finished_spans()
    a = span.attributes
    assert a["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"] == 12
    assert a["proxima.budget_charged_tokens"] == r.json()["usage"]["total_tokens"]  # the prompt once
    assert list(a["gen_ai.response.finish_reasons"]) == ["length"] * 3


def test_log_lines_go_to_the_processs_own_stderr_not_a_replaced_sys_stderr(monkeypatch):
    """In a Serve replica sys.stderr is Serve's buffered logger: a start-up warning never showed."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # what Serve puts there
    h = configure_logging("text")
    try:
        assert h.stream is sys.__stderr__
    finally:
        logging.getLogger("proxima").removeHandler(h)
        logging.getLogger("proxima").propagate = True
