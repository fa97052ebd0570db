"""The gateway (serving.ingress, the same code Ray Serve hosts) in front of real vLLM.

In-process ports (LocalRouter, LocalEngines) with `vllm_http` engines built by
the engine factory from a config, HTTP in through the Starlette app: a
streamed chat completion, and a shared-prefix burst whose repeats all reach the
replica that holds the prefix, as vLLM's own prefix_cache_hits_total shows.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from serving.config import load_config
from serving.engines.factory import EngineSpec, make_engine
from serving.ingress.app import build_app
from serving.ingress.local import LocalEngines, LocalRouter
from serving.ingress.pipeline import Gateway
from serving.routing import Router
from serving.types import Health

pytestmark = pytest.mark.e2e


def _config(urls: list[str], tokenizer: str) -> dict:
    return {
        "home_region": "local",
        "router": {"policy": "latency"},
        # the model's own tokenizer and chat template, as a real deployment configures it
        "models": [{"name": "tiny", "max_model_len": 4096, "default_max_tokens": 16, "tokenizer": tokenizer,
                    "tool_parser": "hermes"}],
        "regions": {"local": {"replicas": len(urls), "profile": "tiny-cpu", "kv_capacity_tokens": 8192,
                              "engine": {"kind": "vllm_http", "options": {"url": urls[0]}}}},
        "serve": {"inject_rtt": False},
    }


@pytest.fixture
async def gateway(vllm_servers, tiny_model):
    urls = vllm_servers.urls[:2]
    cfg = load_config(_config(urls, tiny_model))
    engines = {}
    for i, url in enumerate(urls):
        spec = EngineSpec("vllm_http", f"local-{i}", "local", "tiny", "tiny-cpu", 8192, {"url": url})
        e = make_engine(spec)
        await e.start()
        await e.reset_prefix_cache()
        assert e.snapshot().health is Health.UP
        engines[spec.replica_id] = e
    local = LocalEngines(engines)
    router = LocalRouter(Router("latency", block_size=cfg.block_size, default_profile="tiny-cpu", seed=0), local)
    gw = Gateway(cfg, router, local)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(gw)), base_url="http://gw", timeout=120)
    yield client, engines
    await client.aclose()
    for e in engines.values():
        await e.close()


def _events(body: str) -> list:
    out = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_streamed_chat_completion_through_the_gateway(gateway, tiny_model):
    client, _ = gateway
    r = await client.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 10, "ignore_eos": True,  # vLLM's extension: exactly 10
        "presence_penalty": 0.2, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,  # passed on
        "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "route this call to the fastest replica please"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) >= 2  # streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert text.strip()
    usage = [e for e in events[:-1] if e.get("usage")][-1]["usage"]
    assert usage["completion_tokens"] == 10
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)  # vLLM got the model's own chat template
    text = tok.apply_chat_template([{"role": "user", "content": "route this call to the fastest replica please"}],
                                   add_generation_prompt=True, tokenize=False)
    assert usage["prompt_tokens"] == len(tok(text, add_special_tokens=False).input_ids) > 10


async def test_a_json_response_format_reaches_vllm(gateway):
    client, _ = gateway
    r = await client.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 6, "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": "answer in JSON"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].lstrip().startswith("{")  # vLLM's structured outputs


async def test_logit_bias_reaches_vllm(gateway, tiny_model):
    client, _ = gateway
    meta = json.loads((Path(tiny_model) / "proxima_words.json").read_text())
    word, wid = meta["words"][5], meta["ids"][5]
    r = await client.post("/v1/completions", json={
        "model": "tiny", "prompt": "zo", "max_tokens": 3, "ignore_eos": True, "logit_bias": {str(wid): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == f" {word}" * 3  # every token the one pushed up
    r = await client.post("/v1/completions", json={  # vLLM's stop_token_ids and min_tokens reach it too
        "model": "tiny", "prompt": "zo", "max_tokens": 8, "logit_bias": {str(wid): 100}, "stop_token_ids": [wid],
        "min_tokens": 3})
    # min_tokens keeps the (pushed-up) stop token out of the first three; the fourth is it, and ends
    choice = r.json()["choices"][0]
    assert (choice["finish_reason"], r.json()["usage"]["completion_tokens"]) == ("stop", 4), r.text
    assert word not in choice["text"].split()


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_are_vllms_own(gateway, vllm_servers, stream):
    """Each token's logprob and its alternatives as vLLM's own server shows them (sampled, so the
    chosen token is not always the most likely: chat lists it first, then the best, k in all)."""
    client, _ = gateway
    body = {"model": "tiny", "max_tokens": 4, "ignore_eos": True, "logprobs": True, "top_logprobs": 2,
            "stream": stream, "temperature": 1.0, "seed": 3, "messages": [{"role": "user", "content": "say something"}]}
    ours = await client.post("/v1/chat/completions", json=body)
    async with httpx.AsyncClient(timeout=60) as direct:
        theirs = await direct.post(vllm_servers.urls[0] + "/v1/chat/completions", json=body)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)

    def entries(r):
        if stream:
            return [e for ev in _events(r.text)[:-1] for c in ev["choices"] if c["logprobs"]
                    for e in c["logprobs"]["content"]]
        return r.json()["choices"][0]["logprobs"]["content"]

    got, want = entries(ours), entries(theirs)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        assert (g["token"], g["bytes"]) == (w["token"], w["bytes"])
        assert [t["token"] for t in g["top_logprobs"]] == [t["token"] for t in w["top_logprobs"]]
        assert g["top_logprobs"][0]["token"] == g["token"] and len(g["top_logprobs"]) == 2
        assert [g["logprob"]] + [t["logprob"] for t in g["top_logprobs"]] == pytest.approx(
            [w["logprob"]] + [t["logprob"] for t in w["top_logprobs"]], abs=1e-3)
    # completions: the token itself and the k most likely, k + 1 where it is not among them
    body = {"model": "tiny", "prompt": "say something", "max_tokens": 4, "ignore_eos": True, "logprobs": 1,
            "temperature": 1.0, "seed": 3}
    ours = await client.post("/v1/completions", json=body)
    async with httpx.AsyncClient(timeout=60) as direct:
        theirs = await direct.post(vllm_servers.urls[0] + "/v1/completions", json=body)
    g, w = ours.json()["choices"][0]["logprobs"], theirs.json()["choices"][0]["logprobs"]
    assert g["tokens"] == w["tokens"] and [list(t) for t in g["top_logprobs"]] == [list(t) for t in w["top_logprobs"]]


CITY = {"type": "function", "function": {"name": "pick_city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["lima", "oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_named_tool_choice_makes_vllm_write_the_calls_arguments(gateway, stream):
    client, _ = gateway
    r = await client.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 40, "stream": stream, "tools": [CITY],
        "tool_choice": {"type": "function", "function": {"name": "pick_city"}},
        "messages": [{"role": "user", "content": "pick a city"}]})
    assert r.status_code == 200, r.text
    if stream:
        deltas = [e["choices"][0] for e in _events(r.text)[:-1]]
        calls = [t for d in deltas for t in d["delta"].get("tool_calls") or ()]
        name, args, reason = calls[0]["function"]["name"], "".join(t["function"]["arguments"] for t in calls), \
            deltas[-1]["finish_reason"]
    else:
        choice = r.json()["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        name, args, reason = call["function"]["name"], call["function"]["arguments"], choice["finish_reason"]
    # a random-weight model, held to the parameters' schema by vLLM's structured outputs
    assert name == "pick_city" and args.lstrip().startswith("{")
    if reason == "stop":  # not cut by max_tokens (it may pad with whitespace): the schema held
        assert json.loads(args)["city"] in ("lima", "oslo")


async def test_a_tool_schema_vllm_cannot_use_is_a_400(gateway):
    client, _ = gateway
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}
    r = await client.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 4, "tools": [bad], "tool_choice": {"type": "function", "function": {"name": "f"}},
        "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "banana" in r.json()["error"]["message"], r.text
    r = await client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200  # the replicas were not taken for broken


async def test_tools_with_auto_reach_vllm_in_the_template(gateway, tiny_model):
    client, _ = gateway
    messages = [{"role": "user", "content": "pick a city"}]
    r = await client.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 4, "ignore_eos": True, "tools": [CITY], "messages": messages})
    assert r.status_code == 200, r.text  # vLLM took skip_special_tokens (the tags must reach the parser)
    choice = r.json()["choices"][0]
    # a random-weight model writes no <tool_call>: its words are the content
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] == "length"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    f = CITY["function"]  # as vLLM's server dumps it: description null when unset
    as_vllm = {"type": "function", "function": {"name": f["name"], "description": None, "parameters": f["parameters"]}}
    text = tok.apply_chat_template(messages, tools=[as_vllm], add_generation_prompt=True, tokenize=False)
    assert '"pick_city"' in text
    assert r.json()["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False).input_ids)


async def test_shared_prefix_burst_reaches_the_holder_per_vllm_counters(gateway, tiny_model):
    client, engines = gateway
    words = json.loads((Path(tiny_model) / "proxima_words.json").read_text())["words"]
    rng = random.Random(11)
    prefix = "".join(" " + rng.choice(words) for _ in range(1024))  # 1,024 tokens: 8 full blocks

    async def complete(i: int):
        suffix = "".join(" " + rng.choice(words) for _ in range(40))
        r = await client.post("/v1/completions", json={"model": "tiny", "prompt": prefix + suffix,
                                                       "max_tokens": 4, "stream": False})
        assert r.status_code == 200, r.text
        return r.json()

    async def counters() -> dict[str, tuple[int, int]]:
        for e in engines.values():
            await e.poll()
        return {rid: (e.snapshot().prefix_cache_queries, e.snapshot().prefix_cache_hits)
                for rid, e in engines.items()}

    start = await counters()
    await complete(0)
    warm = await counters()
    (holder,) = [rid for rid in engines if warm[rid][0] > start[rid][0]]
    before = {rid: hits for rid, (_, hits) in warm.items()}
    await asyncio.gather(*(complete(i) for i in range(1, 7)))
    gained = {}
    for rid, e in engines.items():
        await e.poll()
        gained[rid] = e.snapshot().prefix_cache_hits - before[rid]
    assert gained[holder] == 6 * 1024
    assert all(g == 0 for rid, g in gained.items() if rid != holder)


async def test_tokenize_gives_the_ids_vllms_own_server_gives(gateway, vllm_servers):
    client, _ = gateway
    chat = {"model": "tiny", "tools": [CITY], "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "pick a city"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "pick_city", "arguments": '{"city": "lima"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    async with httpx.AsyncClient(timeout=60) as direct:
        for body in (chat, {"model": "tiny", "prompt": "zo ba route this"}):
            ours = await client.post("/tokenize", json=body)
            theirs = await direct.post(vllm_servers.urls[0] + "/tokenize", json=body)
            assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
            assert ours.json()["tokens"] == theirs.json()["tokens"] and ours.json()["count"] == theirs.json()["count"]
            back = await client.post("/detokenize", json={"model": "tiny", "tokens": ours.json()["tokens"]})
            mirror = await direct.post(vllm_servers.urls[0] + "/detokenize",
                                       json={"model": "tiny", "tokens": ours.json()["tokens"]})
            assert back.json()["prompt"] == mirror.json()["prompt"]


async def test_vllms_structured_outputs_choice_through_the_gateway(gateway):
    client, _ = gateway
    r = await client.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 30, "structured_outputs": {"choice": ["route east", "route west"]},
        "messages": [{"role": "user", "content": "which way?"}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]  # a random-weight model, held to the choices by vLLM's grammar
    assert choice["message"]["content"] in ("route east", "route west") and choice["finish_reason"] == "stop"


async def test_n_choices_are_the_answers_vllms_own_server_gives(gateway, vllm_servers):
    """n choices are n engine requests with seeds seed + i, as vLLM's server makes its children:
    the same texts as vLLM's own n, choice by choice, and the usage counts the prompt once."""
    client, _ = gateway
    body = {"model": "tiny", "n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 6, "ignore_eos": True,
            "messages": [{"role": "user", "content": "zo ba route this"}]}
    ours = await client.post("/v1/chat/completions", json=body)
    async with httpx.AsyncClient(timeout=60) as direct:
        theirs = await direct.post(vllm_servers.urls[0] + "/v1/chat/completions", json=body)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    texts = [c["message"]["content"] for c in ours.json()["choices"]]
    assert texts == [c["message"]["content"] for c in theirs.json()["choices"]]
    assert len(set(texts)) > 1
    u, v = ours.json()["usage"], theirs.json()["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"]) == (v["prompt_tokens"], v["completion_tokens"]) == \
           (u["prompt_tokens"], 18)


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_logprobs_is_what_vllms_own_server_gives(gateway, vllm_servers, stream):
    """Completions' `echo` with `logprobs` (how evaluation harnesses score a prompt): the prompt's
    logprobs, none for its first token, then the answer's; token for token vLLM's own."""
    client, _ = gateway
    body = {"model": "tiny", "prompt": "zo ba route this", "max_tokens": 3, "echo": True, "logprobs": 2,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    ours = await client.post("/v1/completions", json=body)
    async with httpx.AsyncClient(timeout=60) as direct:
        theirs = await direct.post(vllm_servers.urls[0] + "/v1/completions", json=body)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)

    def whole(r):
        if not stream:
            ch = r.json()["choices"][0]
            return ch["text"], ch["logprobs"]
        text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in _events(r.text)[:-1]:
            for ch in e["choices"]:
                text += ch["text"]
                for k in lp:
                    lp[k] += (ch["logprobs"] or {}).get(k) or []
        return text, lp

    (text, lp), (want_text, want) = whole(ours), whole(theirs)
    assert text == want_text and text.startswith("zo ba route this")
    assert lp["tokens"] == want["tokens"] and lp["text_offset"] == want["text_offset"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], abs=1e-3)
    assert [sorted(t) for t in lp["top_logprobs"][1:]] == [sorted(t) for t in want["top_logprobs"][1:]]
    n_prompt = len(lp["tokens"]) - 3
    assert n_prompt >= 4 and all(v <= 0 for v in lp["token_logprobs"][1:])


async def test_vllms_sampling_extensions_give_vllms_own_answers(gateway, vllm_servers):
    """include_stop_str_in_output, allowed_token_ids, bad_words and skip_special_tokens reach vLLM
    (found by a review: they were dropped, a 200 with another answer than vLLM's own)."""
    client, _ = gateway
    base = {"model": "tiny", "prompt": "zo ba route this", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    ids = (await client.post("/tokenize", json={"model": "tiny", "prompt": "faba gamou"})).json()["tokens"]

    async def both(extra):
        ours = await client.post("/v1/completions", json={**base, **extra})
        async with httpx.AsyncClient(timeout=60) as direct:
            theirs = await direct.post(vllm_servers.urls[0] + "/v1/completions", json={**base, **extra})
        assert ours.status_code == theirs.status_code == 200, (extra, ours.text, theirs.text)
        got, want = ours.json()["choices"][0], theirs.json()["choices"][0]
        assert (got["text"], got["finish_reason"], got["stop_reason"]) == \
            (want["text"], want["finish_reason"], want["stop_reason"]), extra
        return got["text"]

    plain = await both({})
    stop = plain[2:4]
    assert (await both({"stop": [stop], "include_stop_str_in_output": True})).endswith(stop)
    assert set(await both({"allowed_token_ids": ids[-2:]})) <= set("fabagmou ")
    word = plain.split()[0] if plain.split() else plain[:3]
    await both({"bad_words": [word]})
    await both({"skip_special_tokens": False, "spaces_between_special_tokens": False})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_return_token_ids_are_vllms_own(gateway, vllm_servers, kind, stream):
    """vLLM's return_token_ids (RL trainers read them): the prompt's ids and the answer's, where
    vLLM's own server puts them, whole and streamed (the prompt's once, the answer's as deltas)."""
    client, _ = gateway
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "stream": stream, **({"messages": [{"role": "user", "content": "zo ba route this"}]} if kind == "chat"
                                 else {"prompt": "zo ba route this"})}
    ours = await client.post(path, json=body)
    async with httpx.AsyncClient(timeout=60) as direct:
        theirs = await direct.post(vllm_servers.urls[0] + path, json=body)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)

    def ids(r):
        if not stream:
            d = r.json()
            ch = d["choices"][0]
            return (d if kind == "chat" else ch)["prompt_token_ids"], ch["token_ids"]
        prompt, out = [], []
        for e in _events(r.text)[:-1]:
            for ch in e["choices"]:
                p = (e if kind == "chat" else ch).get("prompt_token_ids")
                if p:
                    prompt.append(p)
                out += ch.get("token_ids") or []
        assert len(prompt) == 1
        return prompt[0], out

    (p, out), (want_p, want_out) = ids(ours), ids(theirs)
    assert (p, out) == (want_p, want_out) and len(out) == 4 and len(p) >= 4
