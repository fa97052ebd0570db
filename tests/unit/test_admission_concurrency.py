"""Under 200 concurrent requests with random usage, no tenant ever passes its cap."""

import asyncio
import random

import pytest

from serving.admission import BudgetPolicy, Ledger
from serving.errors import BudgetExceeded

CAPS = {"a": 5_000, "b": 20_000, "c": 60_000}


@pytest.mark.parametrize("seed", [1, 2, 3], ids=["seed1", "seed2", "seed3"])
async def test_no_tenant_exceeds_cap_under_200_concurrent(tmp_path, seed):
    rng = random.Random(seed)
    policies = {t: BudgetPolicy(tokens_per_day=cap, session_tokens=cap // 2) for t, cap in CAPS.items()}
    ledger = Ledger(policies, str(tmp_path / "l.sqlite"))
    charged = {t: 0 for t in CAPS}
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        tenant = rng.choice(list(CAPS))
        session = rng.choice([None, "s1", "s2"])
        reserve = rng.randint(50, 2_000)  # prompt + max_tokens
        await asyncio.sleep(rng.random() * 0.02)
        try:
            r = ledger.reserve(f"req{i}", tenant, reserve, session)
        except BudgetExceeded:
            refused += 1
            return
        await asyncio.sleep(rng.random() * 0.02)
        used = rng.randint(0, reserve)
        assert ledger.reconcile(r, used)
        charged[tenant] += used
        for t, cap in CAPS.items():  # checked after every settlement, not just at the end
            assert ledger.consumed(t) <= cap
            for s in ("s1", "s2"):
                assert ledger.used[(t, "session", s)] <= cap // 2

    await asyncio.gather(*(one(i) for i in range(200)))
    assert refused > 0  # the caps were actually reached
    assert {t: ledger.consumed(t) for t in CAPS} == charged
    assert not ledger.open and all(v == 0 for v in ledger.held.values())
