"""Circuit breakers: replica open/close, region drain and rejoin, health probes."""

import pytest

from serving.failover import BreakerConfig, FailoverView
from serving.failover.health import probe_once


def view(**cfg) -> FailoverView:
    v = FailoverView(BreakerConfig(**cfg))
    for rid, region in {"eu-1": "eu", "eu-2": "eu", "us-1": "us"}.items():
        v.add(rid, region)
    return v


@pytest.mark.parametrize("events,open_after", [
    ([("f", "eu-1", 0.0)], set()),
    ([("f", "eu-1", 0.0), ("f", "eu-1", 0.1)], {"eu-1"}),
    ([("f", "eu-1", 0.0), ("ok", "eu-1", 0.1), ("f", "eu-1", 0.2)], set()),  # not consecutive
    ([("f", "eu-1", 0.0), ("f", "eu-2", 0.1)], {"eu-1", "eu-2"}),  # whole region failed: drained
    ([("f", "eu-1", 0.0), ("f", "eu-2", 9.0)], set()),  # too far apart for a region outage
    ([("f", "eu-1", 0.0), ("ok", "eu-2", 0.05), ("f", "eu-2", 0.1)], {"eu-1", "eu-2"}),
    ([("ok", "eu-2", 0.2), ("f", "eu-1", 0.3)], set()),  # eu-2 still answers
], ids=["one-failure", "threshold", "reset-by-success", "region-drain", "outside-window",
        "region-drain-after-late-failure", "region-alive"])
def test_when_circuits_open(events, open_after):
    v = view(failures=2, window_s=5.0)
    for kind, rid, t in events:
        (v.failure if kind == "f" else v.success)(rid, t)
    assert {r for r in v.replicas if v.is_open(r)} == open_after
    assert v.region_drained("eu") == (open_after >= {"eu-1", "eu-2"})


def test_rejoin_needs_probes_and_cooldown():
    v = view(failures=1, recoveries=2, cooldown_s=2.0)
    v.failure("us-1", 0.0)
    assert v.changes() == {"us-1": True}
    v.success("us-1", 0.5, probe=False)  # a request's success does not close it
    v.success("us-1", 0.6)
    v.success("us-1", 1.0)
    assert v.is_open("us-1")  # cooldown not over
    v.success("us-1", 2.1)
    v.success("us-1", 2.2)
    assert not v.is_open("us-1") and v.changes() == {"us-1": False}


async def test_probes_drain_a_dead_region_in_one_round_and_rejoin():
    v = view(failures=3, recoveries=1, cooldown_s=0.0)
    alive = {"eu-1": False, "eu-2": False, "us-1": True}

    async def probe(rid):
        if rid == "eu-2":
            raise ConnectionError("actor died")  # raising counts as down
        return alive[rid]

    t = [0.0]
    changed = await probe_once(v, probe, clock=lambda: t[0])
    assert changed == {"eu-1": True, "eu-2": True} and v.region_drained("eu")
    alive["eu-1"] = True
    t[0] = 1.0
    assert await probe_once(v, probe, clock=lambda: t[0]) == {"eu-1": False}
    assert not v.region_drained("eu")


def test_half_open_trial_without_probes():
    v = view(failures=2, half_open_after_s=3.0)
    v.failure("us-1", 0.0)
    v.failure("us-1", 0.1)
    v.changes()
    v.tick(2.0)
    assert v.is_open("us-1")
    v.tick(3.2)
    assert not v.is_open("us-1") and v.changes() == {"us-1": False}
    v.failure("us-1", 3.3)  # the trial failed: open again at once
    assert v.is_open("us-1")


async def test_circuit_feed_pushes_changes_to_router():
    from serving.failover.gateway import CircuitFeed
    from serving.types import Decision, TTFTParts

    pushed = []
    feed = CircuitFeed(FailoverView(BreakerConfig(failures=1)), lambda r, o: pushed.append((r, o)),
                       clock=lambda: 1.0)
    d = Decision("q", "eu-1", "eu", "latency", TTFTParts(0, 0, 0), 0, "")
    feed.record(d, True)
    feed.record(d, False)
    assert pushed == [("eu-1", True)] and feed.failovers == 1
