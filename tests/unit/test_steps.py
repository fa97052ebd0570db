"""Agent-step records: bounded store, tenant isolation, and what each step says (through the app)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obs_helpers import ACME, GLOBEX, build, chat
from serving.errors import InvalidRequest
from serving.observability.steps import StepStore, check_headers

CHAT = "/v1/chat/completions"


def test_each_session_keeps_its_last_steps_and_counts_the_dropped():
    s = StepStore(max_sessions=4, max_steps=3)
    for i in range(5):
        s.add("acme", "s1", {"i": i})
    body = s.get("acme", "s1")
    assert [r["i"] for r in body["data"]] == [2, 3, 4]
    assert [r["n"] for r in body["data"]] == [3, 4, 5]
    assert (body["total_steps"], body["dropped"]) == (5, 2)


def test_least_recently_written_sessions_are_evicted_first():
    s = StepStore(max_sessions=2, max_steps=8)
    s.add("acme", "a", {})
    s.add("acme", "b", {})
    s.add("acme", "a", {})  # a is now the most recent
    s.add("acme", "c", {})  # evicts b
    assert len(s) == 2
    assert s.get("acme", "b") is None
    assert s.get("acme", "a")["total_steps"] == 2 and s.get("acme", "c") is not None


def test_sessions_are_keyed_by_tenant():
    s = StepStore()
    s.add("acme", "shared-name", {"who": "acme"})
    s.add("globex", "shared-name", {"who": "globex"})
    assert [r["who"] for r in s.get("acme", "shared-name")["data"]] == ["acme"]
    assert [r["who"] for r in s.get("globex", "shared-name")["data"]] == ["globex"]
    assert s.get("initech", "shared-name") is None


@pytest.mark.parametrize("session,step", [
    pytest.param("x" * 129, None, id="session-too-long"),
    pytest.param("has space", None, id="session-space"),
    pytest.param("s1", "step\x01", id="step-control-char"),
    pytest.param("", None, id="session-empty"),
])
def test_bad_session_headers_are_rejected(session, step):
    with pytest.raises(InvalidRequest):
        check_headers(session, step)


async def test_a_bad_session_header_is_a_400_with_an_openai_body():
    c, _, _ = build()
    r = await c.post(CHAT, json=chat(), headers={**ACME, "x-session-id": "a" * 300})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-session-id"


async def test_steps_say_where_each_went_why_cached_tokens_queue_tokens_and_budget():
    c, _, _ = build()
    prompt = " ".join(f"w{i}" for i in range(300))
    ids = []
    for step in ("plan", "act"):
        r = await c.post(CHAT, json=chat(prompt, max_tokens=3),
                         headers={**ACME, "x-session-id": "agent-1", "x-agent-step": step,
                                  "x-request-id": f"client-{step}"})
        assert r.status_code == 200
        ids.append((r.headers["x-request-id"], r.headers["x-proxima-replica"], r.json()["usage"]))
    r = await c.get("/v1/sessions/agent-1/steps", headers=ACME)
    assert r.status_code == 200
    body = r.json()
    assert (body["session_id"], body["total_steps"], body["dropped"]) == ("agent-1", 2, 0)
    first, second = body["data"]
    assert [s["step"] for s in body["data"]] == ["plan", "act"] and [s["n"] for s in body["data"]] == [1, 2]
    for s, (rid, replica, usage) in zip(body["data"], ids):
        assert s["request_id"] == rid and s["tenant"] == "acme" and s["status"] == "ok"
        assert s["routing"]["replica"] == replica and s["routing"]["policy"] == "latency"
        assert s["routing"]["reason"] and s["routing"]["candidates"] == 3
        assert s["prompt_tokens"] == usage["prompt_tokens"]
        assert s["completion_tokens"] == usage["completion_tokens"]
        assert s["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert s["budget_charged_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert s["queue_wait_ms"] == s["routing"]["predicted"]["queue_ms"]
        assert s["ttft_ms"] > 0 and s["e2e_ms"] >= s["ttft_ms"]
        assert len(s["trace_id"]) == 32 and s["attempts"][-1]["outcome"] == "ok"
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0  # the second reused the prefix
    assert second["routing"]["predicted_cached_tokens"] > 0


async def test_a_tenant_reads_only_its_own_sessions():
    c, _, _ = build()
    await c.post(CHAT, json=chat(), headers={**ACME, "x-session-id": "secret"})
    assert (await c.get("/v1/sessions/secret/steps", headers=ACME)).status_code == 200
    r = await c.get("/v1/sessions/secret/steps", headers=GLOBEX)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert (await c.get("/v1/sessions/secret/steps")).status_code == 401
    assert (await c.get("/v1/sessions/never-seen/steps", headers=ACME)).status_code == 404


async def test_a_refused_step_is_recorded_with_its_error():
    c, _, _ = build()
    h = {**GLOBEX, "x-session-id": "poor", "x-agent-step": "1"}
    r = await c.post(CHAT, json=chat(max_tokens=64), headers=h)  # over globex's 30 tokens/day
    assert r.status_code == 429
    steps = (await c.get("/v1/sessions/poor/steps", headers=GLOBEX)).json()["data"]
    assert len(steps) == 1
    s = steps[0]
    assert (s["status"], s["error"], s["routing"], s["budget_charged_tokens"]) == \
        ("error", "budget_exceeded", None, 0)


async def test_requests_without_a_session_leave_no_steps():
    c, _, gw = build()
    await c.post(CHAT, json=chat(), headers=ACME)
    assert len(gw.telemetry.store) == 0


@given(st.lists(st.tuples(st.sampled_from(["acme", "globex"]), st.sampled_from("abcdef"),
                          st.integers(0, 999)), max_size=200),
       st.integers(1, 4), st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_store_bounds_order_and_isolation_hold_for_any_sequence(ops, max_sessions, max_steps):
    s = StepStore(max_sessions, max_steps)
    # each tenant's sessions, least recently written first; past the bound, the tenant keeping
    # the most (the first of them to arrive, on a tie) loses its least recent
    model: dict[str, list[tuple[str, list[int]]]] = {}
    for tenant, sid, v in ops:
        s.add(tenant, sid, {"v": v, "tenant": tenant})
        mine = model.setdefault(tenant, [])
        old = [vals for key, vals in mine if key == sid]
        mine[:] = [(key, vals) for key, vals in mine if key != sid] + [(sid, (old[0] if old else []) + [v])]
        while sum(map(len, model.values())) > max_sessions:
            biggest = max(model, key=lambda t: len(model[t]))
            model[biggest].pop(0)
            if not model[biggest]:
                del model[biggest]
    kept = {(t, sid): vals for t, mine in model.items() for sid, vals in mine}
    assert len(s) == len(kept) <= max_sessions
    for tenant, sid, _ in ops:
        body = s.get(tenant, sid)
        if (tenant, sid) not in kept:
            assert body is None  # evicted: least recently written first
            continue
        values = kept[(tenant, sid)]
        assert [r["v"] for r in body["data"]] == values[-max_steps:]
        assert all(r["tenant"] == tenant for r in body["data"])
        assert (body["total_steps"], body["dropped"]) == (len(values), max(0, len(values) - max_steps))



def test_a_tenant_naming_sessions_by_the_thousand_evicts_its_own():
    """Found by a review: one least-recently-used list for all tenants let one tenant's 10,000
    fresh sessions evict every other tenant's steps."""
    s = StepStore(max_sessions=100, max_steps=4)
    s.add("victim", "mine", {"v": 1})
    for i in range(10_000):
        s.add("flood", f"s{i}", {"v": i})
    assert s.get("victim", "mine")["data"] == [{"v": 1, "n": 1}] and len(s) == 100
