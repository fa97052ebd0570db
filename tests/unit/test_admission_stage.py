"""Admission and accounting stages: reserve prompt + max_tokens, settle exactly once."""

import pytest

from serving.admission import BudgetPolicy, Ledger
from serving.admission.stage import LocalLedger, admit, settle
from serving.errors import BudgetExceeded


class FlakyLedger(LocalLedger):
    """The actor restarting: the first calls fail, one after landing its write."""

    def __init__(self, ledger, fail_before=1, fail_after=1):
        super().__init__(ledger)
        self.fail_before, self.fail_after, self.calls = fail_before, fail_after, 0

    async def reconcile(self, r, used):
        self.calls += 1
        if self.fail_before:
            self.fail_before -= 1
            raise ConnectionError("ledger restarting")
        res = await super().reconcile(r, used)
        if self.fail_after:
            self.fail_after -= 1
            raise ConnectionError("answer lost")  # landed, but the caller never heard
        return res


async def test_admit_reserves_prompt_plus_max_tokens():
    led = LocalLedger(Ledger({"t": BudgetPolicy(tokens_per_day=1000)}))
    r = await admit(led, "a", "t", 300, 200, "s")
    assert (r.tokens, r.session) == (500, "s")
    with pytest.raises(BudgetExceeded):
        await admit(led, "b", "t", 300, 201)


@pytest.mark.parametrize("before,after,calls", [(0, 0, 1), (2, 0, 3), (1, 1, 3)],
                         ids=["first-try", "down-then-up", "answer-lost-retried"])
async def test_settle_retries_and_counts_once(before, after, calls):
    ledger = Ledger({"t": BudgetPolicy(tokens_per_day=1000)})
    led = FlakyLedger(ledger, before, after)
    r = await admit(led, "a", "t", 100, 100)
    assert await settle(led, r, 150, backoff_s=0.001) is True
    assert led.calls == calls and ledger.consumed("t") == 150


async def test_settle_gives_up_bounded():
    ledger = Ledger({"t": BudgetPolicy()})
    led = FlakyLedger(ledger, fail_before=100)
    r = await admit(led, "a", "t", 1, 1)
    assert await settle(led, r, 2, attempts=3, backoff_s=0.001) is False and led.calls == 3


async def test_the_ingress_keeps_a_running_requests_hold_and_stops_when_none_runs():
    import asyncio
    from types import SimpleNamespace

    from serving.admission.gateway import BudgetAdmission

    class Clock:
        t = 1_000_000.0

        def __call__(self):
            return self.t

    clock = Clock()
    ledger = Ledger({"acme": BudgetPolicy(tokens_per_day=1000)}, clock=clock)
    adm = BudgetAdmission(LocalLedger(ledger), hold_refresh_s=0.02)
    job = SimpleNamespace(request_id="long", principal=SimpleNamespace(tenant="acme"), prompt_tokens=10,
                          completion_budget=90, session_id=None)
    ticket = await adm.admit(job)
    for _ in range(3):
        clock.t += 600  # each refresh period, 600 s of the ledger's time pass
        await asyncio.sleep(0.05)
        assert ledger.open["long"][1] == clock.t  # touched: its TTL starts again
    await adm.settle(job, ticket, 50)
    await asyncio.sleep(0.01)
    assert adm._refresher.done() and not adm.running  # nothing held: the refresher has ended
    assert ledger.remaining("acme")["budgets"][0]["used"] == 50
