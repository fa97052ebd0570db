"""`n` choices: each its own engine request over the one prompt, as vLLM's server makes them.

The in-process pipeline (real Router, real SimEngines, the ASGI app over httpx), and
the budget ledger through the whole pipeline (tests/unit/test_policies_pipeline's gateway).
"""

import asyncio
from contextlib import aclosing

import pytest

from serving.errors import EngineError
from serving.ingress.app import Responder, _events
from serving.ingress.auth import Principal
from serving.ingress.local import LocalEngines
from serving.ingress.openai_api import parse_chat
from tests.unit.test_gateway_app import chat, events, make, requests_seen
from tests.unit.test_policies_pipeline import auth, client, gw  # noqa: F401 (fixture)
from tests.unit.test_policies_pipeline import chat as tenant_chat


def by_choice(evs: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for ev in evs:
        for ch in ev["choices"]:
            out.setdefault(ch["index"], []).append(ch)
    return out


def idle(engines, router) -> bool:
    return router.router.inflight == 0 and not any(e.core.running or e.core.waiting for e in engines.values())


async def test_n_choices_are_seeded_as_vllms_whole_and_streamed():
    c, engines, router = make()
    seen = requests_seen(engines)
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=4, n=3, seed=5),
                     headers={"x-request-id": "mine"})
    assert r.status_code == 200
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    texts = [ch["message"]["content"] for ch in body["choices"]]
    assert len(set(texts)) == 3 and all(len(t.split()) == 4 for t in texts)
    assert all(ch["finish_reason"] == "length" and ch["message"]["role"] == "assistant" for ch in body["choices"])
    # one engine request per choice, seed + i (vLLM's children), each with its own id
    assert sorted(q.seed for q in seen) == [5, 6, 7]
    assert len({q.request_id for q in seen}) == 3 and all(q.max_tokens == 4 for q in seen)
    assert len({q.prompt_token_ids for q in seen}) == 1
    one = (await c.post("/v1/chat/completions", json=chat(max_tokens=4, seed=6))).json()
    assert one["choices"][0]["message"]["content"] == texts[1]  # choice 1 is what seed 6 writes
    # usage: the prompt once, every choice's completion
    u = body["usage"]
    assert u["prompt_tokens"] == one["usage"]["prompt_tokens"] and u["completion_tokens"] == 12
    assert u["total_tokens"] == u["prompt_tokens"] + 12

    r = await c.post("/v1/chat/completions", json=chat(max_tokens=4, n=3, seed=5, stream=True,
                                                       stream_options={"include_usage": True}))
    evs = events(r.text)
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 12
    assert evs[-1]["usage"]["prompt_tokens"] == u["prompt_tokens"]
    per = by_choice(evs[:-1])
    assert sorted(per) == [0, 1, 2]
    for i, chs in per.items():
        assert chs[0]["delta"]["role"] == "assistant"  # each choice's first event names the role
        assert all("role" not in ch["delta"] for ch in chs[1:])
        assert [ch["finish_reason"] for ch in chs].count("length") == 1 and chs[-1]["finish_reason"] == "length"
        assert "".join(ch["delta"]["content"] or "" for ch in chs) == texts[i]
    assert idle(engines, router)


async def test_n_choices_on_completions_echo_each_and_count_offsets_per_choice():
    c, _, _ = make()
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "route this", "max_tokens": 3,
                                              "n": 2, "seed": 1, "echo": True})
    chs = r.json()["choices"]
    assert [ch["index"] for ch in chs] == [0, 1]
    assert all(ch["text"].startswith("route this") for ch in chs) and chs[0]["text"] != chs[1]["text"]
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "route this", "max_tokens": 3,
                                              "n": 2, "seed": 1, "logprobs": 1, "stream": True})
    per = by_choice(events(r.text))
    for chs in per.values():
        offsets = [o for ch in chs for o in ch["logprobs"]["text_offset"]]
        text = "".join(ch["text"] for ch in chs)
        assert offsets[0] == 0 and len(offsets) == 3
        assert all(text[o:].startswith(t) for o, t in
                   zip(offsets, [t for ch in chs for t in ch["logprobs"]["tokens"]]))


async def test_the_choices_after_the_first_find_its_prompt_cached():
    c, _, _ = make()
    long = "a long shared system prompt " * 60
    r = await c.post("/v1/chat/completions", json=chat(long, max_tokens=4, n=4), headers={"x-session-id": "s"})
    assert r.status_code == 200 and len({ch["message"]["content"] for ch in r.json()["choices"]}) == 4
    steps = sorted((await c.get("/v1/sessions/s/steps")).json()["data"], key=lambda s: s["choice"])
    assert [s["choice"] for s in steps] == [0, 1, 2, 3]
    # the first choice computed the prompt; the router sent the others where it is cached
    first = steps[0]["routing"]["replica"]
    assert all(s["routing"]["replica"] == first for s in steps)
    prompt = r.json()["usage"]["prompt_tokens"]
    assert steps[0]["cached_tokens"] == 0 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert all(s["cached_tokens"] >= prompt - 16 for s in steps[1:])


class FailingChoice(LocalEngines):
    """Engines that refuse one choice's request everywhere (its retries fail too)."""

    def __init__(self, engines, suffix: str):
        super().__init__(engines)
        self.suffix = suffix

    async def open(self, decision, gen):
        if gen.request_id.split("~")[0].endswith(self.suffix):  # every attempt (`<id>~<n>`)
            raise EngineError("this replica refuses the request")
        async for c in super().open(decision, gen):
            yield c


async def test_a_choice_that_cannot_be_opened_fails_the_request_and_closes_the_others():
    c, engines, router = make()
    c.gateway.engines = FailingChoice(engines, "-2")
    for e in engines.values():
        e.time_scale = 1.0  # slow enough that the other choices are mid-answer when it fails
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=50, n=3))
    assert r.status_code == 502 and r.json()["error"]["code"] == "engine_error"
    await asyncio.sleep(0.05)
    assert idle(engines, router)  # the two choices that had started were aborted


async def test_a_client_gone_mid_stream_aborts_every_choice():
    c, engines, router = make()
    for e in engines.values():
        e.time_scale = 1.0
    gw = c.gateway
    parsed = parse_chat(chat(max_tokens=200, n=3, stream=True))
    job = gw.prepare(parsed, Principal("anonymous"), "us", "gone")
    choices = await gw.start(job)
    async with aclosing(_events(choices, Responder("chat", "gone", "m"), lambda e: None)) as body:
        got = [await anext(body) for _ in range(4)]  # the client reads a few events, then leaves
    assert all(x.startswith(b"data: {") for x in got)
    await asyncio.sleep(0.05)
    assert idle(engines, router)
    assert all(s.completion_tokens < 200 for s in choices.streams)


async def test_n_choices_reserve_and_charge_the_budget_once(gw):  # noqa: F811
    async with client(gw) as c:
        h = auth("acme", **{"x-session-id": "n1"})
        # session budget 150: one answer of 60 fits, three of 60 do not
        over = await c.post("/v1/chat/completions", json=tenant_chat("acme", max_tokens=60, n=3), headers=h)
        assert over.status_code == 429 and over.headers["x-proxima-budget"] == "session_tokens"
        ok = await c.post("/v1/chat/completions", json=tenant_chat("acme", max_tokens=20, n=3, seed=3),
                          headers=h)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
        used = ok.json()["usage"]
        assert used["completion_tokens"] == sum(
            len(ch["message"]["content"].split()) for ch in ok.json()["choices"])
        b = await c.get("/v1/budgets", headers=h)
        day = {x["name"]: x for x in b.json()["budgets"]}
        # charged once: the prompt once and the three answers; nothing left reserved
        assert day["session_tokens"]["used"] == used["total_tokens"]
        assert day["session_tokens"]["reserved"] == 0 and day["tokens_per_day"]["reserved"] == 0
        steps = (await c.get("/v1/sessions/n1/steps", headers=h)).json()["data"]
        done = [s for s in steps if s["status"] == "ok"]
        assert sorted(s["choice"] for s in done) == [0, 1, 2]
        assert sum(s["budget_charged_tokens"] for s in done) == used["total_tokens"]


@pytest.mark.parametrize("n", [0, 129, "two"])
async def test_a_bad_n_is_a_400_naming_it(n):
    c, _, _ = make()
    r = await c.post("/v1/chat/completions", json=chat(n=n))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


async def test_n_null_is_one_choice():
    c, _, _ = make()
    r = await c.post("/v1/chat/completions", json=chat(max_tokens=2, n=None))
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


class CountingPending(LocalEngines):
    """Engines that count the engine calls pending together (made, no first chunk yet): under
    Serve 2.60 two pending at once for one HTTP request collide and one is never assigned."""

    def __init__(self, engines, assign_s: float = 0.02):
        super().__init__(engines)
        self.pending = self.most = 0
        self.opened: list[str] = []
        self.assign_s = assign_s

    async def open(self, decision, gen):
        self.pending += 1
        self.most = max(self.most, self.pending)
        self.opened.append(decision.replica_id)
        first = True
        try:
            await asyncio.sleep(self.assign_s)  # Serve assigning a replica: the call is pending meanwhile
            async for c in super().open(decision, gen):
                if first:
                    first = False
                    self.pending -= 1
                yield c
        finally:
            if first:
                self.pending -= 1


async def test_choices_failing_over_together_reach_their_engines_one_at_a_time():
    """Found by a failure drill: a replica killed under a streamed n=2 request froze it for 30 s
    under Serve, as both choices' failover re-opened their engine calls at once."""
    c, engines, router = make()
    counting = c.gateway.engines = CountingPending(engines)
    for e in engines.values():
        e.time_scale = 0.2
    task = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat(max_tokens=60, n=3, seed=2, stream=True)))
    while len(counting.opened) < 3 or not any(e.core.running for e in engines.values()):
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)
    victim = max(engines.values(), key=lambda e: len(e.core.running))
    under = len(victim.core.running)
    assert under >= 2
    victim.kill()
    r = await task
    assert r.status_code == 200
    texts = {i: "".join(ch["delta"].get("content") or "" for ch in chs) for i, chs in by_choice(events(r.text)).items()}
    assert sorted(texts) == [0, 1, 2] and all(len(t.split()) == 60 for t in texts.values())
    assert len(counting.opened) == 3 + under and counting.most == 1  # re-opened, never two pending at once


async def test_waiting_for_a_siblings_dispatch_is_no_replicas_stall():
    """Found by a review: the wait for the dispatch lock ran on the next replica's first-token
    timer, so a healthy replica was declared stalled (and struck) when siblings were slow."""
    from dataclasses import replace

    c, engines, _ = make()
    counting = c.gateway.engines = CountingPending(engines, assign_s=0.3)
    c.gateway.retry = replace(c.gateway.retry, first_token_timeout_s=0.5)
    for e in engines.values():
        e.time_scale = 0.2
    task = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat(max_tokens=400, n=3, seed=2, stream=True),
                                        headers={"x-session-id": "slow-siblings"}))
    for _ in range(5000):  # until every choice has started, two of them on one replica
        if len(counting.opened) == 3 and counting.pending == 0 and \
                max(len(e.core.running) for e in engines.values()) >= 2:
            break
        await asyncio.sleep(0.001)
    victim = max(engines.values(), key=lambda e: len(e.core.running))
    assert len(victim.core.running) >= 2
    victim.kill()
    r = await task
    assert r.status_code == 200
    steps = (await c.get("/v1/sessions/slow-siblings/steps")).json()["data"]
    outcomes = [a for s in steps for a in s["attempts"]]
    assert all(a["outcome"] in ("ok", "failed") for a in outcomes)
    failed = [a for a in outcomes if a["outcome"] == "failed"]
    assert {a["replica"] for a in failed} == {victim.replica_id}, outcomes  # no healthy replica struck


async def test_a_whole_answer_names_the_replica_that_finished_it():
    """Found by a failure drill: after a failover mid-answer, a non-streamed response's
    x-proxima-replica named the dead replica."""
    c, engines, _ = make()
    for e in engines.values():
        e.time_scale = 0.2
    task = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat(max_tokens=60, seed=2)))
    while not any(e.core.running for e in engines.values()):
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)
    victim = next(rid for rid, e in engines.items() if e.core.running)
    engines[victim].kill()
    r = await task
    assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["content"].split()) == 60
    assert r.headers["x-proxima-replica"] != victim and r.headers["x-proxima-replica"] in engines


class ShortFirstChoice(LocalEngines):
    """Choice 0's answer is cut at 2 tokens; the others run on."""

    async def open(self, decision, gen):
        from dataclasses import replace

        if gen.request_id.split("~")[0].endswith("-0"):
            gen = replace(gen, max_tokens=2)
        async for c in super().open(decision, gen):
            yield c


@pytest.mark.parametrize("leave_after_first_done", [True, False])
async def test_a_client_that_left_is_counted_once_whichever_choice_it_cut(leave_after_first_done):
    """Found by a review: only choice 0's own disconnect was counted, so a client that left after
    choice 0 was whole (cutting another) was not counted at all."""
    from prometheus_client.parser import text_string_to_metric_families

    c, engines, router = make()
    gw = c.gateway
    gw.engines = ShortFirstChoice(engines)
    for e in engines.values():
        e.time_scale = 1.0
    job = gw.prepare(parse_chat(chat(max_tokens=200, n=2, stream=True)), Principal("anonymous"), "us", "gone2")
    choices = await gw.start(job)
    async with aclosing(_events(choices, Responder("chat", "gone2", "m"), lambda e: None)) as body:
        async for ev in body:
            if b'"finish_reason":"length"' in ev.replace(b" ", b"") or not leave_after_first_done:
                break  # the client leaves: after choice 0 is whole, or at once
    await asyncio.sleep(0.05)
    assert idle(engines, router)
    left = [s.value for f in text_string_to_metric_families(gw.metrics.render().decode()) for s in f.samples
            if s.name == "proxima_client_disconnects_total"]
    assert left == [1.0]
