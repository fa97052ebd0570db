"""Retry before the first token, continuation after it, bounded attempts."""

import json

import pytest

from serving.errors import EngineError, ResidencyUnavailable
from serving.failover import RetryPolicy, stream_with_failover
from serving.failover.dispatch import Trace

from failover_helpers import Cluster, request

TWO_REGIONS = {"eu-1": "eu", "eu-2": "eu", "us-1": "us", "us-2": "us"}


async def run(cluster, req, gen, policy=RetryPolicy()):
    trace = Trace()
    chunks = [c async for c in stream_with_failover(req, gen, cluster.route, cluster.open,
                                                    cluster.done, policy, trace)]
    return chunks, trace


async def uninterrupted(max_tokens=24):
    c = Cluster.build({"solo": "eu"})
    chunks, _ = await run(c, *request(max_tokens=max_tokens))
    await c.close()
    return chunks


@pytest.mark.parametrize("schedule", [
    [1], [7], [23], [5, 4], [3, 1, 5], [0, 6],
], ids=["after-1", "after-7", "before-last", "two-failures", "three-failures", "before-first-then-mid"])
async def test_continuation_yields_exactly_the_uninterrupted_text(schedule):
    want = await uninterrupted()
    c = Cluster.build(TWO_REGIONS, schedule=list(schedule))
    req, gen = request(regions=frozenset({"eu", "us"}))
    chunks, trace = await run(c, req, gen)
    await c.close()
    assert "".join(x.text for x in chunks) == "".join(x.text for x in want)
    assert [t for x in chunks for t in x.token_ids] == [t for x in want for t in x.token_ids]
    assert [x.completion_tokens for x in chunks] == list(range(1, 25))
    assert {x.request_id for x in chunks} == {"req-1"} and chunks[-1].finish_reason == "length"
    assert chunks[-1].prompt_tokens == want[-1].prompt_tokens  # usage as if uninterrupted
    sent, total = [], 0
    for k in schedule:  # each attempt dies after its k tokens, the next one goes on from there
        total += k
        sent.append(total)
    assert [(a[2], a[3]) for a in trace.attempts] == [(s, "failed") for s in sent] + [(24, "ok")]
    assert trace.continued == sum(1 for k in sent if k > 0)
    assert len(set(trace.replicas)) == len(trace.replicas)  # never the failed replica again


@pytest.mark.parametrize("schedule", [[0], [4], [0, 2, 3]], ids=["before-first", "mid", "three-failures"])
async def test_the_prompts_logprobs_come_once_whatever_fails(schedule):
    """`echo` with `logprobs`: the prompt's logprobs come with the first chunk, and a continuation
    (whose prompt holds the tokens already sent) is not asked for them again."""
    from dataclasses import replace
    c = Cluster.build(TWO_REGIONS, schedule=list(schedule))
    req, gen = request(regions=frozenset({"eu", "us"}))
    asked = []
    open_ = c.open
    c.open = lambda d, g: (asked.append(g.prompt_logprobs), open_(d, g))[1]
    chunks, _ = await run(c, req, replace(gen, prompt_logprobs=1))
    await c.close()
    got = [x.prompt_logprobs for x in chunks if x.prompt_logprobs is not None]
    assert len(got) == 1 and chunks[0].prompt_logprobs is got[0] and len(got[0]) == len(gen.prompt.split())
    sent_before = 0 if schedule[0] else 1  # attempts before any chunk came ask again; later ones do not
    assert asked == [1] * (sent_before + 1) + [None] * (len(asked) - sent_before - 1)


@pytest.mark.parametrize("schedule", [[0], [4], [0, 2, 3]], ids=["before-first", "mid", "three-failures"])
async def test_the_prompts_ids_come_once_whatever_fails(schedule):
    """return_token_ids: the prompt's ids as the engine read it come with the first chunk; a
    continuation's prompt is longer (it holds the tokens sent), so it is not asked for them."""
    from dataclasses import replace
    from serving.engines.tokenizer import encode
    c = Cluster.build(TWO_REGIONS, schedule=list(schedule))
    req, gen = request(regions=frozenset({"eu", "us"}))
    asked = []
    open_ = c.open
    c.open = lambda d, g: (asked.append(g.return_prompt_ids), open_(d, g))[1]
    chunks, _ = await run(c, req, replace(gen, return_prompt_ids=True))
    await c.close()
    got = [x.prompt_token_ids for x in chunks if x.prompt_token_ids is not None]
    assert got == [tuple(encode(gen.prompt))] and chunks[0].prompt_token_ids == got[0]
    sent_before = 0 if schedule[0] else 1
    assert asked == [True] * (sent_before + 1) + [False] * (len(asked) - sent_before - 1)
    want = await uninterrupted()
    assert [t for x in chunks for t in x.token_ids] == [t for x in want for t in x.token_ids]


async def test_a_json_constrained_answer_is_retried_before_its_first_token_but_not_continued():
    from dataclasses import replace
    fmt = {"type": "json_object"}
    c = Cluster.build(TWO_REGIONS, schedule=[0, 5])
    req, gen = request(regions=frozenset({"eu", "us"}))
    with pytest.raises(EngineError, match="cannot continue") as e:
        await run(c, req, replace(gen, response_format=fmt))
    await c.close()
    assert "after 5 tokens" in e.value.message
    c = Cluster.build(TWO_REGIONS, schedule=[0])  # nothing sent yet: a fresh start elsewhere is fine
    chunks, trace = await run(c, req, replace(gen, response_format=fmt))
    await c.close()
    assert [a[3] for a in trace.attempts] == ["failed", "ok"]
    assert chunks[-1].finish_reason == "stop" and isinstance(json.loads("".join(x.text for x in chunks)), dict)


async def test_before_first_token_retries_next_best_in_region_then_another_region():
    c = Cluster.build(TWO_REGIONS, down=("eu-1", "eu-2"))
    for rid in ("eu-1", "eu-2"):  # the router has not heard yet: its snapshot says UP
        c.engines[rid].health = c.engines[rid].health.__class__.UP
        c.router.update(c.engines[rid].snapshot())
        c.engines[rid].kill()
    req, gen = request(regions=frozenset({"eu", "us"}))
    req = req.__class__(**{**{f: getattr(req, f) for f in req.__slots__}, "client_region": "eu"})
    c.router.set_rtt({"eu": {"eu": 1, "us": 80}, "us": {"eu": 80, "us": 1}})
    chunks, trace = await run(c, req, gen)
    await c.close()
    regions = [a[1] for a in trace.attempts]
    assert regions == ["eu", "eu", "us"]
    assert [a[3] for a in trace.attempts] == ["failed", "failed", "ok"]
    assert len(chunks) == 24


async def test_attempts_are_bounded():
    c = Cluster.build(TWO_REGIONS, kill_after={r: 2 for r in TWO_REGIONS})
    req, gen = request()
    with pytest.raises(EngineError, match="failed on 3 replicas"):
        await run(c, req, gen, RetryPolicy(max_attempts=3))
    await c.close()


async def test_residency_never_left_on_failover():
    c = Cluster.build(TWO_REGIONS, kill_after={"eu-1": 4, "eu-2": 4})
    req, gen = request(regions=frozenset({"eu"}))
    got = []
    with pytest.raises(ResidencyUnavailable, match=r"allowed regions \['eu'\]"):
        async for ch in stream_with_failover(req, gen, c.route, c.open, c.done):
            got.append(ch)
    await c.close()
    assert set(c.routed) == {"eu-1", "eu-2"} and len(got) >= 8


async def test_hung_replica_counts_as_failed():
    c = Cluster.build({"a": "eu", "b": "eu"})
    c.engines["a"].profile = c.engines["a"].profile.with_(a_ms=10_000.0)  # 10 s per step
    c.engines["a"].core.profile = c.engines["a"].profile
    c.router.set_circuit("b", True)
    req, gen = request()
    c.router.set_circuit("b", False)
    c.router.update(c.engines["b"].snapshot())
    route_first = c.route

    async def route(r):  # first attempt pinned to the hung replica
        if not r.exclude:
            return c.router.route(r.__class__(**{**{f: getattr(r, f) for f in r.__slots__},
                                                 "exclude": frozenset({"b"})}))
        return await route_first(r)

    chunks = [x async for x in stream_with_failover(
        req, gen, route, c.open, c.done, RetryPolicy(first_token_timeout_s=0.2))]
    await c.close()
    assert len(chunks) == 24 and c.routed[-1] == "b"
