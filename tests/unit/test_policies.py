"""Every routing policy on named cases (table-driven), through the real Router.

Each case builds a small world (replica snapshots, what each replica's cache
holds, in-flight requests) and a request; `EXPECT[case][policy]` says what the
policy must do there: pick one replica, never pick some, or spread.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest

from serving.errors import ModelNotFound, NoReplicaAvailable, ResidencyUnavailable
from serving.prefix import block_hashes
from serving.routing import Router
from serving.routing.policies import POLICIES
from serving.routing.table import RATE_TAU_S
from serving.types import Health, ReplicaSnapshot, RouteRequest

BS = 16
RTT = {"us-east": {"us-east": 2, "eu-west": 75, "ap-south": 190},
       "eu-west": {"us-east": 75, "eu-west": 2, "ap-south": 120},
       "ap-south": {"us-east": 190, "eu-west": 120, "ap-south": 2}}
SYSTEM = list(range(1000, 1000 + 4096))  # a 4k-token shared prefix
ALL = sorted(POLICIES)


@dataclass
class World:
    snaps: list[ReplicaSnapshot]
    cached: dict[str, int] = field(default_factory=dict)  # replica -> tokens of SYSTEM it holds
    inflight: dict[str, int] = field(default_factory=dict)  # replica -> routed, unfinished
    prompt: list[int] = field(default_factory=lambda: SYSTEM + list(range(50, 150)))
    client: str = "us-east"
    allowed: frozenset[str] | None = None


def snap(rid, region="us-east", **kw):
    kw.setdefault("kv_capacity_tokens", 200_000)
    return ReplicaSnapshot(rid, region, "m", **kw)


def build(world: World, policy: str, seed: int = 0) -> Router:
    router = Router(policy, block_size=BS, rtt_ms=RTT, seed=seed, clock=lambda: 0.0)
    for s in world.snaps:
        router.update(s)
    for rid, tokens in world.cached.items():
        router.index.insert(rid, block_hashes(SYSTEM[:tokens], BS, "m"))
    for rid, n in world.inflight.items():
        for k in range(n):
            d = router.choose(request(world, f"busy-{rid}-{k}"))[0]
            # book the request on `rid` itself, whatever the policy would say
            router.on_routed(request(world, f"busy-{rid}-{k}", hashes=False),
                             type(d)(d.request_id, rid, "", d.policy, d.predicted, 0, "test"))
    return router


def request(world: World, rid: str = "req", hashes: bool = True, **kw) -> RouteRequest:
    return RouteRequest(rid, "m", len(world.prompt),
                        block_hashes(world.prompt, BS, "m") if hashes else (),
                        client_region=world.client, allowed_regions=world.allowed, **kw)


CASES: dict[str, World] = {
    # Three equal idle replicas, nothing cached anywhere.
    "cold start": World([snap("a"), snap("b"), snap("c")]),
    # One replica holds the whole 4k system prompt; all idle.
    "hot prefix": World([snap("a"), snap("b"), snap("c")], cached={"b": 4096}),
    # The holder is swamped: a deep prefill queue and 100 requests in flight.
    "overloaded holder": World(
        [snap("a"), snap("b", num_running=100, num_waiting=40, waiting_prefill_tokens=120_000,
                          kv_usage=0.9), snap("c")],
        cached={"b": 4096}, inflight={"b": 100}),
    # The client is in ap-south; one replica there, one far away in us-east.
    "far region": World([snap("near", "ap-south"), snap("far", "us-east")], client="ap-south",
                        prompt=list(range(300))),
    # Only one replica is routable: one down, one draining, one with its circuit open.
    "unhealthy replica": World([snap("down", health=Health.DOWN), snap("drain", health=Health.DRAINING),
                                snap("open", circuit_open=True), snap("ok")],
                               cached={"down": 4096, "drain": 4096, "open": 4096}),
    # The tenant may only use eu-west; a us-east replica is idle and holds the prefix.
    "residency-forbidden": World([snap("us", "us-east"), snap("eu", "eu-west", num_running=20,
                                                                waiting_prefill_tokens=8000)],
                                 cached={"us": 4096}, inflight={"eu": 5},
                                 allowed=frozenset({"eu-west"})),
}

LOAD_ONLY = ("round_robin", "random", "least_request", "power_of_two")

# What each policy must do: ("pick", r) | ("never", {r...}) | ("spread", n) | ("sticky",)
EXPECT: dict[str, dict[str, tuple]] = {
    "cold start": {p: ("spread", 3) for p in ALL} | {"consistent_hash": ("sticky",)},
    "hot prefix": {"latency": ("pick", "b"), "cache_aware": ("pick", "b"), "weighted": ("pick", "b"),
                   "consistent_hash": ("sticky",), "round_robin": ("spread", 3),
                   "random": ("spread", 3), "least_request": ("spread", 3),
                   "power_of_two": ("spread", 3)},
    # latency: 120k queued tokens cost far more than a 4k prefill; cache_aware: 100 vs 0
    # in flight is past its balance thresholds; weighted keeps the cache (its known weakness).
    "overloaded holder": {"latency": ("never", {"b"}), "cache_aware": ("never", {"b"}),
                          "least_request": ("never", {"b"}), "power_of_two": ("never", {"b"}),
                          "weighted": ("pick", "b"), "consistent_hash": ("sticky",),
                          "round_robin": ("spread", 3), "random": ("spread", 3)},
    "far region": {"latency": ("pick", "near"), "consistent_hash": ("sticky",),
                   **{p: ("spread", 2) for p in LOAD_ONLY + ("cache_aware", "weighted")}},
    "unhealthy replica": {p: ("pick", "ok") for p in ALL},
    "residency-forbidden": {p: ("pick", "eu") for p in ALL},
}


@pytest.mark.parametrize("policy", ALL)
@pytest.mark.parametrize("case", list(CASES))
def test_named_case(case, policy):
    world = CASES[case]
    kind, *arg = EXPECT[case][policy]
    routable = {s.replica_id for s in world.snaps if s.routable
                and (world.allowed is None or s.region in world.allowed)}
    picks = Counter()
    for seed in range(12):
        router = build(world, policy, seed)
        for k in range(3):  # a few requests each, finished in between: load stays as built
            d = router.route(request(world, f"r{seed}-{k}", session_id="sess-1"))
            assert d.replica_id in routable, (case, policy, d)
            assert d.policy == policy and d.reason
            router.on_finished(d.request_id)
            picks[d.replica_id] += 1
    if kind == "pick":
        assert set(picks) == {arg[0]}, (case, policy, picks)
    elif kind == "never":
        assert not set(picks) & arg[0], (case, policy, picks)
    elif kind == "spread":
        assert len(picks) == arg[0], (case, policy, picks)
    elif kind == "sticky":  # one session, one replica, every time, for every router instance
        assert len(picks) == 1, (case, policy, picks)


def test_latency_decision_explains_itself():
    world = CASES["hot prefix"]
    d = build(world, "latency").route(request(world))
    assert d.replica_id == "b"
    assert d.cached_tokens == 4096
    assert d.predicted.rtt_ms == 2
    assert d.predicted_ttft_ms == pytest.approx(d.predicted.rtt_ms + d.predicted.queue_ms
                                                + d.predicted.prefill_ms)
    assert "cached 4096" in d.reason
    assert set(d.alternatives) == {"a", "c"}


def test_latency_trades_distance_against_cache():
    """A far replica holding a long prefix wins when the prefill saved exceeds the RTT."""
    long_prompt = SYSTEM * 4 + list(range(64))  # 16k tokens: ~280 ms of prefill on an H100 profile
    world = World([snap("near", "ap-south"), snap("far", "us-east")], client="ap-south",
                  prompt=long_prompt)
    router = build(world, "latency")
    router.index.insert("far", block_hashes(long_prompt, BS, "m"))
    assert router.route(request(world)).replica_id == "far"
    short = World(world.snaps, client="ap-south", prompt=SYSTEM[:512])
    router = build(short, "latency")
    router.index.insert("far", block_hashes(SYSTEM[:512], BS, "m"))
    assert router.route(request(short)).replica_id == "near"  # 512 tokens save < 188 ms


@pytest.mark.parametrize("session, horizon, expect", [
    (None, 1.0, "far"),  # a lone call takes the 2 ms-faster remote cache
    ("s1", 1.0, "near"),  # a session's next calls would pay the 75 ms again: stay near
    ("s1", 0.0, "far"),  # the horizon off: per-call TTFT alone
])
def test_latency_keeps_a_session_near_its_client(session, horizon, expect):
    """eu-west client; 6k tokens of its prompt are cached only in us-east, 75 ms away: the
    prefill they save (~105 ms) beats the RTT once, but not twice."""
    prefix = SYSTEM + list(range(20_000, 22_048))
    world = World([snap("near", "eu-west"), snap("far", "us-east")], client="eu-west",
                  prompt=prefix + list(range(50, 450)))
    router = build(world, "latency")
    router.index.insert("far", block_hashes(prefix, BS, "m"))
    router.policy.session_horizon = horizon
    d = router.route(request(world, session_id=session))
    assert d.replica_id == expect, d
    if session and horizon:
        assert "session: +1x the extra RTT its next call pays" in d.reason, d.reason
        # the price: this call is predicted slower than at the far replica, by less than the RTT
        alone = build(world, "latency")
        alone.index.insert("far", block_hashes(prefix, BS, "m"))
        far = alone.route(request(world))
        assert far.replica_id == "far" and far.predicted_ttft_ms < d.predicted_ttft_ms < far.predicted_ttft_ms + 73


def test_latency_session_leaves_home_when_the_cache_saves_more_than_twice_the_rtt():
    long_prompt = SYSTEM * 4 + list(range(64))  # 16k tokens: ~280 ms of cold prefill
    world = World([snap("near", "eu-west"), snap("far", "us-east")], client="eu-west", prompt=long_prompt)
    router = build(world, "latency")
    router.index.insert("far", block_hashes(long_prompt, BS, "m"))
    assert router.route(request(world, session_id="s1")).replica_id == "far"


@pytest.mark.parametrize("cold_rate, cold_kv, weight, expect", [
    (20, 0.0, 1.0, "holder"),  # traffic flows to both: recomputing the prefix delays ~1.6 requests by 71 ms
    (0, 0.0, 1.0, "cold"),  # nothing goes to the cold replica: the copy delays nobody, spread
    (0.2, 0.0, 1.0, "cold"),  # a trickle: 0.016 requests delayed, 1.1 ms, less than the 4 ms it saves
    (0.2, 0.9, 1.0, "holder"),  # the same trickle on a replica with 90% of its KV in use: 10x
    (20, 0.0, 0.0, "cold"),  # load_weight 0: the request's own TTFT alone (4 ms better)
])
def test_latency_weighs_the_delay_a_cold_prefill_puts_on_the_next_requests(cold_rate, cold_kv, weight, expect):
    """The 4k prefix is cached on `holder`, which has ~75 ms of prefill queued; `cold` has
    no queue. Recomputing the prefix there is 4 ms faster for this request, but the requests
    routed to `cold` after it wait for the 71 ms it spends recomputing what `holder` holds."""
    world = World([snap("holder", waiting_prefill_tokens=4000), snap("cold", kv_usage=cold_kv)],
                  cached={"holder": 4096})
    router = build(world, "latency")
    router.policy.load_weight = weight
    for rid, rate in (("holder", 20), ("cold", cold_rate)):
        n = int(rate * 60)  # `rate` requests/s routed there over the last minute
        for k in range(n):
            router.table.routed(router.table.index[rid], -60 + 60 * k / n)
    rates = router.table.route_rate(np.array([router.table.index["holder"]]), 0.0)
    assert rates[0] == pytest.approx(20, rel=0.1)
    ctx = router.context(request(world))
    ids = [router.table.ids[i] for i in ctx.cands]
    assert ctx.ttft_ms[ids.index("cold")] < ctx.ttft_ms[ids.index("holder")] - 2  # own TTFT alone: cold
    d = router.route(request(world))
    assert d.replica_id == expect, d.reason
    # the cost is the copy's: the holder recomputes nothing, a copy where traffic flows says what it costs
    assert ("recomputing held tokens delays the next ones" in d.reason) == (d.replica_id == "cold"
                                                                           and weight > 0 and cold_rate > 0)


def test_latency_predicts_the_wait_for_kv_on_a_full_replica():
    """A replica whose KV cannot take the queue ahead plus this prompt admits it only as
    running requests end and free theirs: they free what they hold over about one decode
    lifetime, which the router learns from requests that ended (first token -> end)."""
    t = {"now": 0.0}
    router = Router("latency", block_size=BS, rtt_ms=RTT, clock=lambda: t["now"])
    # "full": 40k tokens of KV, 95% held by running requests, 1,000 queued: 1,000 left for us
    router.update(snap("full", kv_capacity_tokens=40_000, kv_usage=0.95, num_running=30,
                       waiting_prefill_tokens=1000))
    router.update(snap("roomy", kv_capacity_tokens=40_000, kv_usage=0.5, num_running=30,
                       waiting_prefill_tokens=1500))

    def predict(prompt_tokens):
        ctx = router.context(RouteRequest(f"p{prompt_tokens}", "m", prompt_tokens))
        return {router.table.ids[i]: float(q) for i, q in zip(ctx.cands, ctx.queue_ms)}

    compute = predict(3000)  # no request has ended yet: no decode lifetime, the queue's compute only
    assert compute["full"] < compute["roomy"]
    d = router.route(RouteRequest("q", "m", 3000))
    assert d.replica_id == "full" and "waiting for KV" not in d.reason
    router.on_first_token("q")
    t["now"] = 2.0
    router.on_finished("q")  # a decode lifetime of 2 s
    router.update(snap("full", kv_capacity_tokens=40_000, kv_usage=0.95, num_running=30,
                       waiting_prefill_tokens=1000))
    # 2,000 tokens short; 38,000 held are freed over 2 s: 105 ms until the prompt fits
    assert predict(3000) == pytest.approx({"full": 2000 / 38_000 * 2000, "roomy": compute["roomy"]})
    assert predict(900)["full"] == pytest.approx(compute["full"])  # fits: no wait
    assert router.route(RouteRequest("q2", "m", 3000)).replica_id == "roomy"
    only_full = RouteRequest("q3", "m", 3000, exclude=frozenset({"roomy"}))
    assert "queue waiting for KV 105.3" in router.choose(only_full)[0].reason
    router.on_first_token("q2")
    t["now"] = 60.0
    router.on_finished("q2", ok=False)  # a failed request teaches nothing about decode lifetimes
    assert predict(3000)["full"] == pytest.approx(2000 / 38_000 * 2000)
    router.update(snap("new"))  # membership changes: the lifetime learnt stays with its replica
    router.remove("roomy")
    assert predict(3000)["full"] == pytest.approx(2000 / 38_000 * 2000)


def test_routing_rate_decays_and_survives_membership_changes():
    t = {"now": 0.0}
    world = World([snap("a"), snap("b")])
    router = Router("latency", block_size=BS, rtt_ms=RTT, clock=lambda: t["now"])
    for s in world.snaps:
        router.update(s)
    for k in range(10):  # ten requests at t = 0
        router.route(RouteRequest(f"q{k}", "m", 10, exclude=frozenset({"b"})))
    i = router.table.index["a"]

    def rate(rows=None):
        rows = np.array([i]) if rows is None else rows
        return router.table.route_rate(rows, t["now"])

    # the decayed count, divided by the part of it that the router's age has filled
    assert rate()[0] == pytest.approx(10 / RATE_TAU_S / (1 - np.exp(-1 / RATE_TAU_S)))  # age counts from 1 s
    t["now"] = RATE_TAU_S
    assert rate()[0] == pytest.approx(10 / RATE_TAU_S * np.exp(-1) / (1 - np.exp(-1)))
    t["now"] = 10 * RATE_TAU_S
    assert rate()[0] == pytest.approx(10 / RATE_TAU_S * np.exp(-10), rel=1e-3)  # long since: plain decay
    router.update(snap("c"))  # a new replica: the rates stay with their rows
    router.remove("b")
    i = router.table.index["a"]
    rates = rate(np.arange(len(router.table)))
    assert rates[i] == pytest.approx(10 / RATE_TAU_S * np.exp(-10), rel=1e-3) and rates.sum() == pytest.approx(rates[i])


def test_round_robin_rotates_and_burst_spreads_under_latency():
    world = CASES["cold start"]
    router = build(world, "round_robin")
    seq = [router.route(request(world, f"q{i}")).replica_id for i in range(6)]
    assert seq[:3] == seq[3:] and len(set(seq[:3])) == 3
    # A burst of identical cold requests, none finished: bookings spread them.
    router = build(world, "latency")
    burst = Counter(router.route(request(world, f"q{i}")).replica_id for i in range(9))
    assert len(burst) == 3


def test_bookings_make_a_burst_follow_the_first_request():
    """The second request of a burst sees the first one's blocks before any engine reports."""
    world = CASES["cold start"]
    router = build(world, "latency")
    first = router.route(request(world, "q1"))
    hashes = block_hashes(world.prompt, BS, "m")
    assert router.index.match(hashes) == {first.replica_id: len(hashes)}
    ctx = router.context(request(world, "q2"))
    pos = [router.table.ids[i] for i in ctx.cands].index(first.replica_id)
    assert ctx.cached_blocks[pos] == len(hashes)
    # ... and its uncached prefill is queued there: the holder is not predicted idle.
    assert ctx.queue_ms[pos] > 0 and ctx.queue_ms.sum() == ctx.queue_ms[pos]


def test_failed_request_takes_back_its_guessed_blocks():
    world = CASES["cold start"]
    router = build(world, "latency")
    first = router.route(request(world, "q1"))
    router.on_finished("q1", ok=False)
    assert router.index.match(block_hashes(world.prompt, BS, "m")) == {}
    assert router.inflight == 0 and first.replica_id in {"a", "b", "c"}


@pytest.mark.parametrize("policy", ALL)
@pytest.mark.parametrize("world, req_kw, error", [
    (World([snap("a")]), {"model": "nope"}, ModelNotFound),
    (World([snap("a", "us-east")], allowed=frozenset({"eu-west"})), {}, ResidencyUnavailable),
    (World([snap("a", "eu-west", health=Health.DOWN)], allowed=frozenset({"eu-west"})), {},
     ResidencyUnavailable),
    (World([snap("a", health=Health.DOWN)]), {}, NoReplicaAvailable),
    (World([snap("a")]), {"exclude": frozenset({"a"})}, NoReplicaAvailable),
])
def test_empty_candidate_set_says_why(policy, world, req_kw, error):
    router = build(world, policy)
    req = request(world)
    fields = {f: getattr(req, f) for f in req.__dataclass_fields__} | req_kw
    with pytest.raises(error) as e:
        router.route(RouteRequest(**fields))
    assert 400 <= e.value.status < 600 and e.value.message


def test_excluded_replica_is_skipped_for_retries():
    world = CASES["hot prefix"]
    router = build(world, "latency")
    req = request(world)
    fields = {f: getattr(req, f) for f in req.__dataclass_fields__} | {"exclude": frozenset({"b"})}
    assert router.route(RouteRequest(**fields)).replica_id in {"a", "c"}


def test_unknown_policy_and_bad_options():
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("fastest")
    with pytest.raises(ValueError, match="bad options"):
        Router("latency", nonsense=1)
