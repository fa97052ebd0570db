"""The gateway on real Ray Serve, over real HTTP: OpenAI client, SSE, routing, aborts, bad input."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "llama3-8b"


def chat(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def test_openai_client_non_streaming(gateway_url):
    c = openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused")
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                  max_tokens=5)
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content.split()) == 5
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 5, 9)  # "<|user|> hello there <|assistant|>"
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_openai_client_streaming_with_usage(gateway_url):
    c = openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused")
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream me please"}], max_tokens=4,
        stream=True, stream_options={"include_usage": True}))
    text = [ch.choices[0].delta.content for ch in chunks if ch.choices]
    assert len(text) == 4 and all(t.strip() for t in text)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices] == [None, None, None, "length"]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 4)
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


def test_n_choices_through_serve(gateway_url):
    """Found by a newcomer's walkthrough: under Serve, choices dispatched together to one replica
    sometimes never left its router (n of 3-4 hung, then a 502); in-process they did not."""
    c = openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused", timeout=30, max_retries=0)
    for n in (4, 16):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"choices {n}"}],
                                      max_tokens=3, n=n, seed=1)
        assert [ch.index for ch in r.choices] == list(range(n))
        assert r.usage.completion_tokens == 3 * n and len({ch.message.content for ch in r.choices}) > 1
    seen: dict[int, str] = {}
    for ch in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "choices streamed"}],
                                        max_tokens=3, n=4, stream=True):
        for choice in ch.choices:
            seen[choice.index] = seen.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(seen) == [0, 1, 2, 3] and all(len(t.split()) == 3 for t in seen.values())


def test_openai_client_completions(gateway_url):
    c = openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused")
    r = c.completions.create(model=MODEL, prompt="one two three", max_tokens=3)
    assert r.object == "text_completion"
    assert len(r.choices[0].text.split()) == 3
    assert r.usage.prompt_tokens == 3


def test_sse_framing_exact_on_the_wire(gateway_url):
    """Raw bytes from a socket: `data: {json}\\n\\n` events, `data: [DONE]\\n\\n` last."""
    body = json.dumps(chat("frame this", max_tokens=3, stream=True)).encode()
    port = int(gateway_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-type: text/event-stream" in head.lower()
    assert b"transfer-encoding: chunked" in head.lower()
    data = _dechunk(payload)
    events = data.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    objs = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert [o["object"] for o in objs] == ["chat.completion.chunk"] * 3
    assert [o["choices"][0]["finish_reason"] for o in objs] == [None, None, "length"]
    assert b": " not in data.replace(b"data: ", b"")  # compact JSON, no spaces after separators


def _dechunk(b: bytes) -> bytes:
    out = b""
    while b:
        size, _, rest = b.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out += rest[:n]
        b = rest[n + 2:]
    return out


def test_headers_say_where_it_went(client):
    r = client.post("/v1/chat/completions", json=chat("where am i", max_tokens=1),
                    headers={"x-client-region": "eu-west", "x-request-id": "req-abc.1"})
    assert r.status_code == 200
    assert r.headers["x-proxima-region"] == "eu-west"  # 1 ms away beats 80 ms away
    assert r.headers["x-proxima-replica"].startswith("eu-west-")
    assert float(r.headers["x-proxima-predicted-ttft-ms"]) > 0
    assert r.headers.get_list("x-request-id") == ["req-abc.1"]


def test_long_shared_prefix_goes_back_to_its_replica(client):
    for trial in range(3):
        prefix = " ".join(f"doc{trial}w{i}" for i in range(3000))  # 3000 tokens: ~57 ms to prefill
        first = client.post("/v1/chat/completions", json=chat(prefix + " question one", max_tokens=2))
        assert first.status_code == 200
        home = first.headers["x-proxima-replica"]
        assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        for q in ("question two", "another question"):
            again = client.post("/v1/chat/completions", json=chat(prefix + " " + q, max_tokens=2))
            assert again.headers["x-proxima-replica"] == home
            assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2992


def settled_view(client, timeout=15.0):
    """The router's view once no request is anywhere in flight.

    Engines push their counters every snapshot period (0.1 s here), so a view
    read right after an earlier test can show counters from before that test's
    last requests (a 14 ms request fits between two pushes, and the stale
    counters even look consistent). Settled: nothing in flight, every replica's
    started == finished + aborted + failed, and the same counters in two views
    0.3 s (three pushes) apart.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        view = client.get("/admin/router").json()
        counters = {r: v.get("counters") for r, v in view["replicas"].items()}
        idle = view["inflight"] == 0 and all(
            c["started"] == c["finished"] + c["aborted"] + c["failed"] for c in counters.values() if c)
        if idle and counters == last:
            return view
        last = counters if idle else None
        assert time.monotonic() < deadline, f"gateway never went idle: {view}"
        time.sleep(0.3)


def test_client_disconnect_aborts_engine_work(gateway_url, client):
    before = settled_view(client)
    body = json.dumps(chat("a long answer please", max_tokens=4000, stream=True)).encode()
    port = int(gateway_url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(65536)
    replica = next(line.split(b": ", 1)[1].decode() for line in got.split(b"\r\n")
                   if line.lower().startswith(b"x-proxima-replica"))
    s.close()  # gone mid-stream: ~4000 tokens * 6 ms were still to come
    aborted0 = before["replicas"][replica]["counters"]["aborted"]
    deadline = time.monotonic() + 10
    while True:
        view = client.get("/admin/router").json()
        rep = view["replicas"][replica]
        if rep["counters"]["aborted"] == aborted0 + 1 and rep["num_running"] == 0 and view["inflight"] == 0:
            break
        assert time.monotonic() < deadline, f"engine still working after disconnect: {rep}, {view['inflight']}"
        time.sleep(0.1)
    assert rep["counters"]["finished"] == before["replicas"][replica]["counters"]["finished"]


BAD = [
    ("malformed-json", b'{"model": "llama3-8b", "messages": [', 400, None, None),
    ("not-an-object", b'["hi"]', 400, None, None),
    ("messages-wrong-type", json.dumps({"model": MODEL, "messages": "hi"}), 400, "messages", None),
    ("max-tokens-wrong-type", json.dumps(chat("hi", max_tokens="ten")), 400, "max_tokens", None),
    ("empty-messages", json.dumps({"model": MODEL, "messages": []}), 400, "messages", None),
    ("missing-model", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), 400, "model", None),
    ("unknown-model", json.dumps(chat("hi") | {"model": "gpt-9"}), 404, "model", "model_not_found"),
    ("prompt-over-context", json.dumps(chat("word " * 9000)), 400, "messages", "context_length_exceeded"),
    ("max-tokens-zero", json.dumps(chat("hi", max_tokens=0)), 400, "max_tokens", None),
    ("max-tokens-negative", json.dumps(chat("hi", max_tokens=-3)), 400, "max_tokens", None),
    ("max-tokens-over-context", json.dumps(chat("hi", max_tokens=9000)), 400, "max_tokens",
     "context_length_exceeded"),
    ("unknown-client-region", None, 400, "x-client-region", None),
]


@pytest.mark.parametrize("body,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_and_gateway_keeps_serving(client, body, status, param, code):
    headers = {"content-type": "application/json"}
    if body is None:
        body, headers["x-client-region"] = json.dumps(chat("hi", max_tokens=1)), "mars"
    r = client.post("/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)
    ok = client.post("/v1/chat/completions", json=chat("still there?", max_tokens=1))
    assert ok.status_code == 200


def test_models_health_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get("/health").json() == {"status": "ok", "replicas_up": 4, "replicas": 4}
    text = client.get("/metrics").text
    assert 'proxima_requests_total{model="llama3-8b",region="' in text  # by route, status, tenant too
    assert "proxima_ttft_seconds_bucket" in text and "proxima_routing_decision_seconds_count" in text
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_router_decides_in_well_under_a_millisecond_and_serve_obeys(client):
    stats = client.get("/admin/router").json()
    assert stats["policy"] == "latency"
    assert 0 < stats["route_us_p50"] < 500
    counters = [r["counters"] for r in stats["replicas"].values()]
    assert sum(c["started"] for c in counters) > 20
    assert [c["misrouted"] for c in counters] == [0] * 4  # every call reached the replica chosen
    # the ingress asks over the direct channel once it is open (the first calls go over Ray)
    chan = stats["router_channel"]
    assert chan["open"] and chan["calls"] > 10 and chan["lost"] == 0, chan


def test_router_of_a_config_no_engine_uses_any_more_exits(client):
    """A redeploy with another config leaves the old router behind: it must go away by itself,
    and take the config's ledger and telemetry actors with it."""
    import asyncio

    import ray

    from serving.ingress.metrics import GatewayMetrics
    from serving.ray.ledger import LedgerClient, start_ledger
    from serving.ray.router_actor import NAMESPACE, actor_name, config_digest, router_actor
    from serving.ray.telemetry import RayTelemetry, telemetry_actor
    from serving.types import ReplicaSnapshot
    from tests.integration.conftest import CONFIG

    config = {**CONFIG, "router": {**CONFIG["router"], "idle_exit_s": 1.0}}
    name = f"proxima-router-{config_digest(config)}"
    actor = router_actor(config)
    # the config's other shared actors, as its ingress replicas start them
    ledger = start_ledger({}, None, name=actor_name("ledger", config))
    telemetry = telemetry_actor(actor_name("telemetry", config), 10, 8)
    ray.get([ledger.pid.remote(), telemetry.push.remote("replica-a", None, [])])
    snap = ReplicaSnapshot("us-east-old", "us-east", "llama3-8b", kv_capacity_tokens=200_000)
    t_end = time.monotonic() + 2.5
    while time.monotonic() < t_end:  # an engine still reports: the router stays
        ray.get(actor.update.remote(snap))
        time.sleep(0.2)
    assert ray.get(actor.stats.remote())["replicas"]

    def seconds_until_gone() -> float:  # it kills itself, name and all
        t = time.monotonic()
        while True:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                return time.monotonic() - t
            assert time.monotonic() - t < 15, "idle router did not exit"
            time.sleep(0.2)

    assert seconds_until_gone() >= 0.9  # silence from the last report on
    for call in (ledger.pid.remote, lambda: telemetry.steps.remote("t", "s", [])):
        deadline = time.monotonic() + 10  # it took the config's ledger and telemetry along
        while True:
            try:
                ray.get(call(), timeout=10)
            except ray.exceptions.ActorDiedError:
                break
            assert time.monotonic() < deadline, "the idle router left its ledger or telemetry behind"
            time.sleep(0.2)

    async def clients_find_them_again():  # should the app come back: its clients create them afresh
        led = LedgerClient(ledger, reconnect=lambda: start_ledger({}, None, name=actor_name("ledger", config)))
        tel = RayTelemetry(telemetry, "replica-a", GatewayMetrics(), flush_s=0.05,
                           reconnect=lambda: telemetry_actor(actor_name("telemetry", config), 10, 8))
        tel.record_step("t", "s", {"i": 1})
        while tel._flusher is not None and not tel._flusher.done():  # its flush meets the dead actor
            await asyncio.sleep(0.05)
        remaining = await led.remaining("nobody")
        await led.reserve("held", "nobody", 10)  # the ingress keeps a running request's hold
        touched = await led.touch(["held", "never-held"])
        return remaining, await tel.steps("t", "s"), touched  # the step was kept

    remaining, steps, touched = asyncio.run(clients_find_them_again())
    assert touched == 1
    assert [x["i"] for x in steps["data"]] == [1] and remaining["tenant"] == "nobody"
    for kind in ("ledger", "telemetry"):
        ray.kill(ray.get_actor(actor_name(kind, config), namespace=NAMESPACE), no_restart=True)
    fresh = router_actor(config)  # whoever asks next gets a new one under the same name
    assert ray.get(fresh.stats.remote())["replicas"] == {}
    ray.get(fresh.channel.remote())  # as an ingress would: a router nobody reports to exits as well
    seconds_until_gone()
