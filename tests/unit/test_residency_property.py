"""Residency is never violated over random topologies, failures and policies."""

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from serving.admission.residency import effective_regions
from serving.errors import EngineError, NoReplicaAvailable, PermissionDenied, ResidencyUnavailable
from serving.failover import RetryPolicy, stream_with_failover

from failover_helpers import Cluster, request

REGIONS = ["eu", "us", "ap", "sa"]
POLICIES = ["latency", "round_robin", "random", "least_request", "power_of_two",
            "consistent_hash", "cache_aware", "weighted"]

replica = st.tuples(st.sampled_from(REGIONS), st.sampled_from(["up", "down", "fails"]),
                    st.integers(0, 10))  # region, state, tokens before it fails
region_set = st.one_of(st.none(), st.sets(st.sampled_from(REGIONS), min_size=1).map(frozenset))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas=st.lists(replica, min_size=1, max_size=8), tenant=region_set,
       header=st.one_of(st.none(), st.sets(st.sampled_from(REGIONS), min_size=1)),
       policy=st.sampled_from(POLICIES), attempts=st.integers(1, 4))
def test_no_path_leaves_allowed_regions(replicas, tenant, header, policy, attempts):
    try:
        allowed = effective_regions(tenant, ",".join(sorted(header)) if header else None)
    except PermissionDenied:
        assert tenant is not None and header and not set(header) <= tenant  # narrowing only
        return
    assert allowed is None or tenant is None or allowed <= tenant
    topo = {f"r{i}": region for i, (region, _, _) in enumerate(replicas)}
    down = [f"r{i}" for i, (_, state, _) in enumerate(replicas) if state == "down"]
    fails = {f"r{i}": k for i, (_, state, k) in enumerate(replicas) if state == "fails"}
    ok_allowed = [r for r, reg in topo.items() if r not in down and r not in fails
                  and (allowed is None or reg in allowed)]
    up_allowed = [r for r, reg in topo.items() if r not in down and (allowed is None or reg in allowed)]

    async def go():
        c = Cluster.build(topo, policy, down=down, kill_after=fails)
        req, gen = request(max_tokens=12, regions=allowed)
        out, err = [], None
        try:
            async for ch in stream_with_failover(req, gen, c.route, c.open, c.done,
                                                 RetryPolicy(max_attempts=attempts)):
                out.append(ch)
        except (EngineError, NoReplicaAvailable) as e:
            err = e
        await c.close()
        return c.routed, out, err

    routed, out, err = asyncio.run(go())
    assert all(allowed is None or topo[r] in allowed for r in routed)  # the property
    assert len(routed) == len(set(routed)) <= attempts
    if not up_allowed:
        assert not routed
        assert isinstance(err, ResidencyUnavailable if allowed is not None else NoReplicaAvailable)
    elif err is None:
        assert sum(len(c.token_ids) for c in out) == 12
    else:  # failing only when every try failed: attempts spent, or allowed replicas exhausted
        assert set(routed) <= set(fails)
        assert len(routed) == attempts or set(routed) >= set(up_allowed) - set(ok_allowed) or \
            not ok_allowed
    if ok_allowed and len(up_allowed) - len(ok_allowed) < attempts:
        assert err is None  # a good allowed replica was reachable within the bound


@pytest.mark.parametrize("tenant,header,want", [
    (None, None, None),
    (frozenset({"eu", "us"}), None, frozenset({"eu", "us"})),
    (frozenset({"eu", "us"}), "eu", frozenset({"eu"})),
    (None, "eu, us", frozenset({"eu", "us"})),
    (frozenset({"eu"}), " ", frozenset({"eu"})),
], ids=["anywhere", "tenant-only", "header-narrows", "header-without-tenant", "blank-header"])
def test_effective_regions(tenant, header, want):
    assert effective_regions(tenant, header) == want


def test_header_cannot_widen():
    with pytest.raises(PermissionDenied, match=r"\['us'\] are outside") as e:
        effective_regions(frozenset({"eu"}), "eu,us")
    assert e.value.status == 403 and e.value.code == "region_not_allowed"
