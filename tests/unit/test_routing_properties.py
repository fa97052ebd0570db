"""Property tests over random replica sets and requests (hypothesis).

1. No policy ever returns a replica that a hard filter removes (wrong model,
   down, draining, circuit open, outside the allowed regions, already tried);
   when every replica is filtered out, routing raises a 4xx/5xx error instead.
2. `latency` never returns a replica whose predicted TTFT is more than its
   configured margin above the best candidate's. The prediction is recomputed
   here from the scalar latency model (serving.routing.latency_model), not read
   back from the router's vectorised columns, so the two are checked against
   each other too. For a request of a session (with `session_horizon` > 0) the
   bound is on TTFT plus the horizon times the extra RTT its next calls would
   pay (see serving.routing.policies.latency); with `load_weight` > 0 it also
   includes the delay that recomputing what another candidate holds adds to
   the requests routed there after it (the replica's recent routing rate, from
   the requests in flight here, over 1 - its KV usage).
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.errors import ProximaError
from serving.prefix import block_hashes
from serving.routing import Router
from serving.routing.policies import POLICIES
from serving.routing.table import RATE_TAU_S
from serving.types import Health, ReplicaSnapshot, RouteRequest

REGIONS = ("us-east", "eu-west", "ap-south")
RTT = {"us-east": {"us-east": 2, "eu-west": 75, "ap-south": 190},
       "eu-west": {"us-east": 75, "eu-west": 2, "ap-south": 120},
       "ap-south": {"us-east": 190, "eu-west": 120, "ap-south": 2}}
BS = 16
PREFIX = list(range(7, 7 + 64 * BS))

replica = st.fixed_dictionaries({
    "region": st.sampled_from(REGIONS),
    "model": st.sampled_from(("m", "m", "m", "small")),
    "health": st.sampled_from((Health.UP, Health.UP, Health.UP, Health.DOWN, Health.DRAINING)),
    "circuit_open": st.sampled_from((False, False, True)),
    "num_running": st.integers(0, 300),
    "num_waiting": st.integers(0, 50),
    "waiting_prefill_tokens": st.integers(0, 100_000),
    "kv_usage": st.floats(0, 1),
    "profile": st.sampled_from(("llama3-8b-h100", "tiny-cpu", "")),
    "cached_blocks": st.integers(0, 64),
    "inflight": st.integers(0, 5),
})

request = st.fixed_dictionaries({
    "model": st.sampled_from(("m", "m", "small", "missing")),
    "prompt_blocks": st.integers(0, 64),
    "tail": st.integers(0, 2000),
    "client": st.sampled_from(REGIONS + ("",)),
    "allowed": st.none() | st.frozensets(st.sampled_from(REGIONS), max_size=3),
    "exclude": st.integers(0, 3),
    "session": st.none() | st.sampled_from(("s1", "s2")),
})


def build(policy: str, replicas: list[dict], seed: int) -> Router:
    router = Router(policy, block_size=BS, rtt_ms=RTT, seed=seed, clock=lambda: 0.0)
    for i, r in enumerate(replicas):
        router.update(ReplicaSnapshot(
            f"r{i}", r["region"], r["model"], num_running=r["num_running"],
            num_waiting=r["num_waiting"], waiting_prefill_tokens=r["waiting_prefill_tokens"],
            kv_capacity_tokens=100_000, kv_usage=r["kv_usage"], health=r["health"],
            circuit_open=r["circuit_open"], profile=r["profile"]))
        router.index.insert(f"r{i}", block_hashes(PREFIX[: r["cached_blocks"] * BS], BS, r["model"]))
    for i, r in enumerate(replicas):  # requests in flight, booked where they went
        for k in range(r["inflight"] if r["model"] == "m" else 0):
            try:
                router.route(RouteRequest(f"bg{i}-{k}", "m", 100))
            except ProximaError:
                break
    return router


def make_request(q: dict) -> RouteRequest:
    tokens = PREFIX[: q["prompt_blocks"] * BS] + list(range(90_000, 90_000 + q["tail"]))
    n = max(1, len(tokens))
    return RouteRequest("req", q["model"], n, block_hashes(tokens, BS, q["model"]),
                        client_region=q["client"], allowed_regions=q["allowed"],
                        exclude=frozenset(f"r{i}" for i in range(q["exclude"])),
                        session_id=q["session"])


def allowed_ids(replicas: list[dict], req: RouteRequest) -> set[str]:
    return {f"r{i}" for i, r in enumerate(replicas)
            if r["model"] == req.model and r["health"] is Health.UP and not r["circuit_open"]
            and (req.allowed_regions is None or r["region"] in req.allowed_regions)
            and f"r{i}" not in req.exclude}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas=st.lists(replica, min_size=1, max_size=10), q=request,
       policy=st.sampled_from(sorted(POLICIES)), seed=st.integers(0, 2**16))
def test_no_policy_returns_a_filtered_out_replica(replicas, q, policy, seed):
    router = build(policy, replicas, seed)
    req = make_request(q)
    ok = allowed_ids(replicas, req)
    try:
        d = router.route(req)
    except ProximaError as e:
        assert not ok, f"{policy} raised {e!r} with candidates {ok}"
        assert e.status in (404, 503)
        return
    assert d.replica_id in ok
    assert d.candidates == len(ok)
    assert set(d.alternatives) <= ok - {d.replica_id}


def scalar_ttft(router: Router, rid: str, req: RouteRequest) -> float:
    """Predicted TTFT from the scalar model: rtt + queue wait + prefill of the uncached part."""
    return sum(scalar_parts(router, rid, req))


def scalar_parts(router: Router, rid: str, req: RouteRequest) -> tuple[float, float, float]:
    i = router.table.index[rid]
    s, perf = router.table.snaps[i], router.table.perf[i]
    cached = router.index.match(req.block_hashes).get(rid, 0) * BS
    uncached = max(1, req.prompt_tokens - cached)
    queued = s.waiting_prefill_tokens + int(router.table.booked_tokens[i])
    rtt = RTT.get(req.client_region, {}).get(s.region, 0.0)
    return rtt, perf.queue_ms(queued, s.num_running, s.num_waiting), perf.prefill_ms(uncached, s.num_running)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas=st.lists(replica, min_size=1, max_size=10), q=request, seed=st.integers(0, 2**16),
       margin_ms=st.sampled_from((0.0, 1.0, 25.0)), margin_frac=st.sampled_from((0.0, 0.02, 0.15)),
       horizon=st.sampled_from((0.0, 1.0, 3.0)), load=st.sampled_from((0.0, 1.0, 3.0)))
def test_latency_is_within_its_margin_of_the_best(replicas, q, seed, margin_ms, margin_frac, horizon, load):
    router = build("latency", replicas, seed)
    pol = router.policy
    pol.tie_margin_ms, pol.tie_margin_frac, pol.session_horizon = margin_ms, margin_frac, horizon
    pol.load_weight = load
    req = make_request(q)
    ok = allowed_ids(replicas, req)
    if not ok:
        return
    d = router.choose(req)[0]
    parts = {rid: scalar_parts(router, rid, req) for rid in ok}
    predicted = {rid: sum(p) for rid, p in parts.items()}
    # every background request was routed at t=0, the clock: rate = count / RATE_TAU_S, over
    # the part of the decayed count a 1-s-old router has filled (see ReplicaTable.route_rate)
    routed = {rid: sum(1 for f in router._inflight.values() if f.row_id == rid) for rid in ok}
    fill = 1 - math.exp(-1 / RATE_TAU_S)
    busy = {rid: min(replicas[int(rid[1:])]["kv_usage"], 0.95) for rid in ok}
    unc = {rid: req.prompt_tokens - router.index.match(req.block_hashes).get(rid, 0) * BS for rid in ok}
    extra = {rid: unc[rid] - min(unc.values()) for rid in ok}  # recomputed here, held by another candidate
    b = {rid: router.table.perf[router.table.index[rid]].profile.b_ms_per_token
         * router.table.perf[router.table.index[rid]].scale for rid in ok}
    score = {rid: predicted[rid] + load * routed[rid] / RATE_TAU_S / fill * (q_ + p_) / 1000 * b[rid] * extra[rid]
             / (1 - busy[rid]) for rid, (_, q_, p_) in parts.items()}
    if req.session_id is not None and horizon:
        rtt = {rid: RTT.get(req.client_region, {}).get(replicas[int(rid[1:])]["region"], 0.0) for rid in ok}
        score = {rid: score[rid] + horizon * (rtt[rid] - min(rtt.values())) for rid in ok}
    best = min(score.values())
    margin = max(margin_ms, margin_frac * best)
    assert score[d.replica_id] <= best + margin + 1e-6, (d, score)
    assert abs(d.predicted_ttft_ms - predicted[d.replica_id]) < 1e-6 * max(1.0, min(predicted.values()))
