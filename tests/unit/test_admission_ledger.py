"""Token budgets: reserve, reconcile, release, Retry-After, persistence, restart."""

import pytest

from serving.admission import BudgetPolicy, Ledger
from serving.errors import BudgetExceeded

DAY0 = 86400.0 * 20000 + 3600.0  # 01:00 UTC on some day


class Clock:
    def __init__(self, t: float = DAY0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def ledger(path=None, clock=None, **limits) -> Ledger:
    return Ledger({"acme": BudgetPolicy(**limits)}, path, clock=clock or Clock())


def budget(l: Ledger, name: str, session=None) -> dict:
    return next(b for b in l.remaining("acme", session)["budgets"] if b["name"] == name)


@pytest.mark.parametrize("limits,session,reserved,refused_budget,retry_after", [
    ({"tokens_per_day": 1000}, None, [600], "tokens_per_day", "1"),  # in flight holds the rest
    ({"tokens_per_minute": 600}, None, [500], "tokens_per_minute", "45"),  # 450 tokens at 10/s
    ({"session_tokens": 700}, "s1", [600], "session_tokens", "1"),
    ({"session_tokens_per_minute": 60}, "s1", [], "session_tokens_per_minute", None),  # too big: no wait helps
    ({"tokens_per_day": 400}, None, [], "tokens_per_day", None),  # larger than the cap itself
    ({"session_tokens": 150}, "s1", [], "session_tokens", None),
], ids=["day-cap-held", "rate-refill", "session-cap-held", "request-larger-than-rate", "request-larger-than-day",
        "request-larger-than-session"])
def test_refusal_names_budget_and_retry_after(limits, session, reserved, refused_budget, retry_after):
    l = ledger(**limits)
    for i, n in enumerate(reserved):
        l.reserve(f"r{i}", "acme", n, session)
    with pytest.raises(BudgetExceeded) as e:
        l.reserve("big", "acme", 500 if refused_budget != "tokens_per_minute" else 550, session)
    assert e.value.status == 429
    assert e.value.headers.get("Retry-After") == retry_after  # found by a review: a day's wait for what never fits
    assert (retry_after is None) == ("request alone is larger" in e.value.message)
    assert e.value.headers["x-proxima-budget"] == refused_budget
    assert f"`{refused_budget}`" in e.value.message and e.value.code == "budget_exceeded"


def test_day_cap_used_up_waits_for_midnight():
    l = ledger(tokens_per_day=1000)
    l.reconcile(l.reserve("a", "acme", 900), 900)
    with pytest.raises(BudgetExceeded) as e:
        l.reserve("b", "acme", 200)
    assert e.value.headers["Retry-After"] == str(23 * 3600)


def test_reconcile_releases_the_rest_and_is_idempotent():
    l = ledger(tokens_per_day=1000, tokens_per_minute=10_000)
    r = l.reserve("a", "acme", 800)
    assert budget(l, "tokens_per_day") == {"name": "tokens_per_day", "limit": 1000, "used": 0,
                                           "reserved": 800, "remaining": 200,
                                           "resets_in_s": 82800.0}
    assert budget(l, "tokens_per_minute")["remaining"] == 9200
    assert l.reconcile(r, 300) is True
    assert l.reconcile(r, 300) is False  # a retried reconcile counts nothing
    assert budget(l, "tokens_per_day")["used"] == 300
    assert budget(l, "tokens_per_day")["remaining"] == 700
    assert budget(l, "tokens_per_minute")["remaining"] == 9700


def test_release_charges_nothing():
    l = ledger(tokens_per_day=1000)
    l.release(l.reserve("a", "acme", 1000))
    assert budget(l, "tokens_per_day")["remaining"] == 1000
    assert l.reserve("b", "acme", 1000).tokens == 1000


def test_same_request_reserves_once():
    l = ledger(tokens_per_day=1000)
    assert l.reserve("a", "acme", 600) == l.reserve("a", "acme", 600)
    assert budget(l, "tokens_per_day")["reserved"] == 600


def test_unknown_tenant_uses_wildcard_policy():
    l = Ledger({"*": BudgetPolicy(tokens_per_day=10)}, clock=Clock())
    with pytest.raises(BudgetExceeded):
        l.reserve("a", "anyone", 11)


def test_sessions_are_separate():
    l = ledger(session_tokens=500)
    l.reconcile(l.reserve("a", "acme", 500, "s1"), 500)
    with pytest.raises(BudgetExceeded):
        l.reserve("b", "acme", 1, "s1")
    assert l.reserve("c", "acme", 500, "s2").session == "s2"


def test_restart_keeps_totals_and_open_reservations(tmp_path):
    path, clock = str(tmp_path / "ledger.sqlite"), Clock()
    l = ledger(path, clock, tokens_per_day=1000)
    l.reconcile(l.reserve("done", "acme", 400), 250)
    open_r = l.reserve("inflight", "acme", 500)
    l.store.close()
    l2 = ledger(path, clock, tokens_per_day=1000)
    assert budget(l2, "tokens_per_day")["used"] == 250
    assert budget(l2, "tokens_per_day")["reserved"] == 500  # may still be running: stays held
    assert l2.reconcile(open_r, 120) is True  # its late reconcile is charged once
    assert l2.reconcile(open_r, 120) is False
    assert budget(l2, "tokens_per_day")["used"] == 370
    assert budget(l2, "tokens_per_day")["reserved"] == 0


def test_restart_releases_stale_reservations(tmp_path):
    path, clock = str(tmp_path / "ledger.sqlite"), Clock()
    l = ledger(path, clock, tokens_per_day=1000)
    l.reserve("lost", "acme", 900)
    l.store.close()
    clock.t += 1000  # past the 900 s TTL
    l2 = ledger(path, clock, tokens_per_day=1000)
    assert budget(l2, "tokens_per_day")["reserved"] == 0
    assert l2.store.db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0


def test_a_touched_hold_outlives_the_ttl_and_an_untouched_one_does_not(tmp_path):
    """Found by a security review: a generation longer than the TTL lost its hold, and a cap could
    be passed by what it went on to use."""
    path, clock = str(tmp_path / "ledger.sqlite"), Clock()
    l = ledger(path, clock, tokens_per_day=1000)
    l.reserve("long", "acme", 600)
    l.reserve("lost", "acme", 300)
    for _ in range(4):  # 4 x 600 s = 2400 s, the TTL is 900 s: the ingress touches what still runs
        clock.t += 600
        assert l.touch(["long", "never-held"]) == 1
    with pytest.raises(BudgetExceeded):
        l.reserve("next", "acme", 500)  # "lost" expired (its 300 are free), "long" still holds 600
    assert budget(l, "tokens_per_day")["reserved"] == 600
    l.store.close()
    clock.t += 600  # a restart within the TTL of the last touch keeps it
    assert budget(ledger(path, clock, tokens_per_day=1000), "tokens_per_day")["reserved"] == 600


def test_wal_mode(tmp_path):
    l = ledger(str(tmp_path / "l.sqlite"))
    assert l.store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("bad,msg", [
    ({"tokens_per_day": -1}, "tokens_per_day"),
    ({"tokens_per_week": 5}, "unknown key"),
    ({"tokens_per_minute": "many"}, "positive integer"),
], ids=["negative", "unknown-key", "not-int"])
def test_policy_validation_names_key(bad, msg):
    with pytest.raises(ValueError, match=msg):
        BudgetPolicy.from_dict(bad, "tenants.acme.budget")


def test_what_each_session_leaves_behind_is_swept(tmp_path):
    """Found by two reviews: every client-named session left a zero hold and a rate bucket for
    good, and settled ids were pruned only at start-up: state grew without bound."""
    clock = Clock()
    l = ledger(str(tmp_path / "l.db"), clock=clock, tokens_per_day=10**9, session_tokens_per_minute=600)
    for i in range(500):
        r = l.reserve(f"r{i}", "acme", 100, f"s{i}")
        l.reconcile(r, 40)
    assert len(l.buckets) == 500 and not [k for k, v in l.held.items() if v == 0]
    clock.t += 61  # every session's bucket has refilled
    l.reserve("late", "acme", 10, "s-late")
    assert list(l.buckets) == [("acme", "s-late")]
    assert budget(l, "session_tokens_per_minute", "s3")["remaining"] == 600  # as a fresh (full) bucket
    assert l.store.db.execute("SELECT COUNT(*) FROM settled").fetchone()[0] == 500
    clock.t += 3 * 86400  # settled ids older than the keep window go within the hour
    l.reserve("later", "acme", 10)
    assert l.store.db.execute("SELECT COUNT(*) FROM settled").fetchone()[0] == 0
