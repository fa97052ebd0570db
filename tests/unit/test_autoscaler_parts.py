"""The autoscaler's parts: demand window, cache-aware choices, Serve's policy model, scenario keys,
and the control loops on the simulator's virtual clock."""

from __future__ import annotations

import pytest

from serving.autoscaler.cache import ReplicaHeat, coldest, hottest_prefixes
from serving.autoscaler.serve_baseline import ServeConfig, ServeDeploymentScaler
from serving.autoscaler.window import DemandWindow
from serving.prefix import PrefixIndex
from serving.sim.checks import ScenarioError
from serving.sim.loop import run_policies
from serving.sim.scenario import parse


# --- the Ray controller's drain bookkeeping ---------------------------------------
@pytest.mark.parametrize("rows, targets, busy, want", [
    # a drain left behind (its controller died, or it timed out); Serve keeps both: serve again
    ([("a1", "us", True), ("a2", "us", False)], {("us", "m"): 2}, set(), ["a1"]),
    # a drain under way in this pool: leave it to that drain
    ([("a1", "us", True), ("a2", "us", False)], {("us", "m"): 1}, {("us", "m")}, []),
    # no drain under way, but Serve is still stopping one of the pool's replicas
    ([("a1", "us", True), ("a2", "us", False)], {("us", "m"): 1}, set(), []),
    # one pool's state does not spill into another's
    ([("a1", "us", True), ("b1", "eu", True), ("b2", "eu", False)], {("us", "m"): 1, ("eu", "m"): 1},
     set(), ["a1"]),
])
def test_stale_drains(rows, targets, busy, want):
    from serving.ray.autoscaler import stale_drains
    view = [{"replica_id": rid, "region": region, "model": "m", "draining": d} for rid, region, d in rows]
    assert stale_drains(view, targets, busy) == want


def test_kv_is_planned_against_what_the_engines_report():
    from serving.ray.autoscaler import reported_kv
    config = {("us", "m"): 200_000, ("eu", "m"): 200_000, ("ap", "m"): 200_000}
    rows = [{"region": "us", "model": "m", "kv_capacity_tokens": 61_440},
            {"region": "us", "model": "m", "kv_capacity_tokens": 57_344},  # the smaller GPU bounds the pool
            {"region": "eu", "model": "m", "kv_capacity_tokens": 0},  # not reported (yet): the config's
            {"region": "xx", "model": "m", "kv_capacity_tokens": 1}]  # not a pool of this autoscaler
    got = reported_kv(rows, config)
    assert got == {("us", "m"): 57_344, ("eu", "m"): 200_000, ("ap", "m"): 200_000}
    # a pool scaled to no replicas keeps its last report
    assert reported_kv([], got)[("us", "m")] == 57_344


# --- demand window ---------------------------------------------------------------
def test_window_averages_demand_per_client_region_and_forgets_the_old():
    w = DemandWindow(window_s=10)
    for i in range(100):  # 10 rps from us for 10 s
        w.arrival(i / 10, "us", "m", 1000, 100)
    d = w.demand(10.0)["m"]["us"]
    assert d.rps == pytest.approx(10, rel=0.05)
    assert d.prompt_tps == pytest.approx(10_000, rel=0.05)
    assert d.decode_tps == pytest.approx(1_000, rel=0.05)
    assert w.demand(30.0) == {}


def test_window_cache_share():
    w = DemandWindow(window_s=20)
    w.arrival(0.5, "eu", "m", 100, 10)
    w.cache(0.0, "m", 1000, 100)
    w.cache(20.0, "m", 3000, 1100)
    assert w.demand(20.0)["m"]["eu"].cached_frac == pytest.approx(0.5)


@pytest.mark.parametrize("now", [200.0, 200.5, 203.0])
@pytest.mark.parametrize("rate,slope", [(100, 0.0), (100, 2.0), (100, -2.0), (20, 0.5)],
                         ids=["flat", "rising", "falling", "small-rising"])
def test_window_trend_is_the_rate_slope_over_the_mean(now, rate, slope):
    """growth = d(rate)/dt / rate, unbiased: a flat rate reads 0 wherever the tick falls
    (the halves estimate it replaced read +0.9 %/s for a flat rate over 15 s)."""
    w = DemandWindow(window_s=15)
    t, rng = now - 16.0, __import__("random").Random(1)
    while t < now:  # a deterministic fluid stream: arrivals at the instantaneous rate
        r = rate + slope * (t - (now - 7.5))
        t += 1.0 / max(r, 1e-3) * (0.98 + 0.04 * rng.random())
        if t < now:
            w.arrival(t, "us", "m", 100, 10)
    d = w.demand(now)["m"]["us"]
    assert d.rps == pytest.approx(rate, rel=0.06)
    assert d.growth == pytest.approx(slope / rate, abs=0.002)


# --- cache-aware choices --------------------------------------------------------------
def test_the_coldest_replica_is_the_one_whose_cache_served_least():
    heat = [ReplicaHeat("a", 5000, 3), ReplicaHeat("b", 100, 9), ReplicaHeat("c", 100, 2)]
    assert coldest(heat) == "c"  # tie on hits: fewer in flight drains sooner


def test_hottest_prefixes_are_the_most_widely_held_blocks():
    idx = PrefixIndex(16)
    for r in ("r1", "r2", "r3"):
        idx.add_replica(r, 16 * 100)
    shared = [1, 2, 3]  # a system prompt every replica holds
    for r, own in (("r1", [10, 11]), ("r2", [20]), ("r3", [30])):
        idx.insert(r, shared + own)
    idx.insert("r1", [1, 2, 40])  # 40 is held once
    hot = hottest_prefixes(idx, ["r1", "r2", "r3"], max_blocks=3)
    assert hot == [1, 2, 3] or sorted(hot) == [1, 2, 3]
    assert set(hottest_prefixes(idx, ["r1", "r2", "r3"], max_blocks=100)) == {1, 2, 3, 10, 11, 20, 30, 40}
    # What the simulator warms a new replica with: only what the fleet shares.
    assert hottest_prefixes(idx, ["r1", "r2", "r3"], max_blocks=100, min_holders=2) == [1, 2, 3] or \
        sorted(hottest_prefixes(idx, ["r1", "r2", "r3"], max_blocks=100, min_holders=2)) == [1, 2, 3]


def test_a_new_replica_takes_traffic_the_moment_it_is_warm_not_at_the_next_tick():
    from serving.autoscaler.sim import ProximaHooks
    from serving.sim.loop import Simulator

    sc = parse({**BASE, "autoscaling": {"tick_s": 5, "replica_start_s": 1,
                                        "compare": [{"name": "proxima", "kind": "proxima"}]}})
    hooks = ProximaHooks(sc, sc.autoscaling, sc.autoscaling.variants[0])
    sim = Simulator(sc, sc.policies[0], hooks=hooks)
    shared = [101, 102, 103]
    for rid in ("eu-0", "eu-1"):
        sim.router.index.insert(rid, shared)
    sim.router.index.insert("eu-0", [900])  # one replica's own history: not copied
    seen = []
    sim.at(0.5, lambda s, t: (hooks._bring_up(s, "eu", t, t), seen.append((dict(hooks.warming),
                                                                            hooks.prewarmed_blocks))))
    sim.run()
    (rid, ready), = seen[0][0].items()
    p = sim.replicas[rid].profile
    tokens = seen[0][1] * p.block_size
    assert ready == pytest.approx(0.5 + (p.a_ms + p.b_ms_per_token * tokens) / 1000)  # well before t = 5
    r = sim.router.table
    assert rid not in hooks.warming and not r.snaps[r.index[rid]].circuit_open
    assert set(shared) <= set(sim.router.index.blocks(rid)) and 900 not in sim.router.index.blocks(rid)


# --- Ray Serve's target_ongoing_requests policy ------------------------------------------
def test_serve_model_waits_upscale_delay_then_scales_to_ongoing_over_target():
    s = ServeDeploymentScaler(ServeConfig(target_ongoing_requests=10, upscale_delay_s=3, downscale_delay_s=20,
                                          look_back_period_s=2, min_replicas=1, max_replicas=10))
    target = 2
    seen = []
    for t in range(8):
        s.record(float(t), 60.0)  # 60 ongoing, 2 replicas: wants 6
        target = s.decide(float(t), 2, target)
        seen.append(target)
    assert seen[:3] == [2, 2, 2] and seen[3] == 6


def test_serve_model_downscale_needs_its_own_delay_and_a_flip_resets_it():
    s = ServeDeploymentScaler(ServeConfig(target_ongoing_requests=10, upscale_delay_s=0, downscale_delay_s=5,
                                          look_back_period_s=1))
    target = 4
    for t, ongoing in enumerate([5, 5, 5, 50, 5, 5, 5, 5, 5, 5]):
        s.record(float(t), ongoing)
        target = s.decide(float(t), 4 if target >= 4 else target, target)
    assert target == 5 or target == 1  # up at t=3 (no delay), then down only after 5 s of low load


# --- scenario keys ------------------------------------------------------------------------
BASE = {"duration_s": 60, "regions": {"us": {"replicas": 2, "profile": "llama3-8b-a100"},
                                      "eu": {"replicas": 2, "profile": "llama3-8b-a100"}},
        "rtt_ms": {"us": {"us": 1, "eu": 80}, "eu": {"eu": 1}},
        "workload": [{"generator": "shared_prefix", "rate_per_s": {"eu": 30}, "groups": 4,
                      "prefix_tokens": 512, "question_tokens": [200, 600], "output_tokens": [20, 60]}]}


@pytest.mark.parametrize("bad, msg", [
    ({"compare": [{"name": "x", "kind": "magic"}]}, "autoscaling.compare[0].kind"),
    ({"compare": [{"name": "serve", "upscale_delay": 3}]}, "autoscaling.compare[0].upscale_delay"),
    ({"budget": 1, "min_replicas": 1}, "autoscaling.budget"),
    ({"min_replicas": {"mars": 1}}, "autoscaling.min_replicas.mars"),
    ({"compare": [{"name": "s", "kind": "static", "replicas": 0}]}, "autoscaling.compare[0].replicas"),
    ({"compare": [{"name": "p", "kind": "proxima", "replicas": 3}]}, "autoscaling.compare[0].replicas"),
])
def test_bad_autoscaling_keys_are_named(bad, msg):
    with pytest.raises(ScenarioError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        parse({**BASE, "autoscaling": bad})


# --- control loops in the simulator ----------------------------------------------------------
def test_in_the_simulator_replicas_follow_demand_and_none_is_lost_draining():
    sc = parse({**BASE, "autoscaling": {
        "tick_s": 2, "replica_start_s": 2, "budget": 4, "min_replicas": 1,
        "compare": [{"name": "static"},
                    {"name": "proxima", "kind": "proxima", "downscale_delay_s": 6, "move_delay_s": 4,
                     "upscale_cooldown_s": 2, "window_s": 6, "lead_s": 0, "replica_cost_ms": 0.5}]}})
    out = run_policies(sc)
    static, prox = out["policies"]["static"], out["policies"]["proxima"]
    assert prox["failed"] == 0 and static["failed"] == 0
    reps = out["_series"]["proxima"]["autoscaler"]["replicas"]
    assert reps["eu"][-1] > reps["us"][-1], reps  # all demand is in eu: replicas moved there
    assert max(a + b for a, b in zip(reps["us"], reps["eu"])) <= 4  # the budget, draining ones included
    assert prox["autoscaler"]["replicas_stopped"] >= 1


def test_a_static_fleet_of_another_size_is_split_evenly_and_compared_at_equal_replica_hours():
    from serving.bench.autoscaling import comparison

    sc = parse({**BASE, "autoscaling": {"compare": [{"name": "static"},
                                                    {"name": "static-3", "kind": "static", "replicas": 3}]}})
    assert sc.autoscaling.variants[1].options["replicas"] == {"us": 2, "eu": 1}  # the first listed gets the rest
    out = run_policies(sc)
    series = out["_series"]["static-3"]["autoscaler"]["replicas"]
    assert (series["us"][-1], series["eu"][-1]) == (2, 1)
    hours = {n: r["replica_hours"] for n, r in out["policies"].items()}
    assert hours["static-3"] == pytest.approx(hours["static"] * 3 / 4, rel=0.01)

    def r(h, p99, g):
        return {"replica_hours": h, "ttft_p99_ms": p99, "goodput": g}

    res = {"static": r(2.4, 200.0, 0.99), "static-s": r(2.0, 400.0, 0.90), "static-x": r(2.5, 210.0, 0.98),
           "mid": r(2.2, 150.0, 0.95), "cheap": r(1.8, 300.0, 0.999), "good": r(2.3, 100.0, 0.995)}
    c = comparison(res, {"static": "static", "static-s": "static", "static-x": "static", "mid": "proxima",
                         "cheap": "proxima", "good": "proxima"})  # static-x: bigger, a hair worse (noise)
    assert set(c) == {"mid", "cheap", "good"}
    assert c["mid"]["ttft_p99_static_over_this_at_equal_replica_hours"] == pytest.approx(300 / 150)
    assert c["mid"]["replica_hours_saved_at_equal_slo_attainment"] == pytest.approx(1 - 2.2 / (2.0 + 0.4 * 5 / 9),
                                                                                   abs=1e-3)
    assert c["cheap"]["ttft_p99_static_over_this_at_equal_replica_hours"] is None  # below every static fleet
    assert c["good"]["replica_hours_saved_at_equal_slo_attainment_at_least"] == pytest.approx(1 - 2.3 / 2.4,
                                                                                             abs=1e-3)
    assert c["mid"]["replica_hours_saved_vs_static"] == pytest.approx(1 - 2.2 / 2.4, abs=1e-3)


def test_serve_baseline_runs_in_the_simulator_within_the_budget():
    sc = parse({**BASE, "autoscaling": {
        "tick_s": 2, "replica_start_s": 2, "budget": 5, "min_replicas": 1,
        "compare": [{"name": "serve", "kind": "serve", "target_ongoing_requests": 1, "upscale_delay_s": 2,
                     "downscale_delay_s": 10, "look_back_period_s": 2}]}})
    out = run_policies(sc)
    reps = out["_series"]["serve"]["autoscaler"]["replicas"]
    assert out["policies"]["serve"]["failed"] == 0
    assert max(a + b for a, b in zip(reps["us"], reps["eu"])) <= 5
    assert reps["us"][-1] == 1  # no load at us: Serve scaled it down to its minimum


def test_the_replicas_to_drain_are_the_ones_serve_stops():
    """Found by a review: the controller drained the replica the router had seen last, and Serve
    stopped another one, which took new requests until it went. Serve 2.60's order: not yet
    running first, off the head node first, the node with the fewest replicas first, newest first."""
    pytest.importorskip("ray")
    from serving.ray.autoscaler import serve_stop_order

    def rep(uid, node, t, state="RUNNING"):
        return {"replica_id": uid, "node_id": node, "start_time_s": t, "state": state}

    details = {"controller_info": {"node_id": "head"}, "applications": {
        "app": {"deployments": {
            "engine-us": {"replicas": [rep("a", "head", 1.0), rep("b", "head", 3.0), rep("c", "w1", 2.0),
                                       rep("d", "w2", 0.5), rep("e", None, 9.0, "STARTING"),
                                       rep("f", "w2", 9.5, "STOPPING")]},
            "ingress": {"replicas": [rep("i1", "w2", 0.1), rep("i2", "w2", 0.2)]}}},
        "other": {"deployments": {"x": {"replicas": [rep("x1", "w1", 0.1)]}}}}}
    # e starting; then w1 (2 running in all) before w2 (3), the head last; newest first on each
    assert serve_stop_order(details, "app", "engine-us") == ["e", "c", "d", "b", "a"]
    assert serve_stop_order(details, "app", "nope") == [] and serve_stop_order({}, "app", "engine-us") == []
