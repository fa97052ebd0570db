"""kill -9 the ledger's process mid-load; after a restart the totals are exact.

The driver plays the ingress: every request was admitted, then its reconcile is
sent. The ledger process is killed while reconciles are still queued in its
pipe. After the restart the driver re-sends every reconcile it has no answer for
(as the ingress's accounting stage does), and the persisted totals must equal
the sum of all completed requests' usage: nothing lost, nothing counted twice.
"""

import json
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict

from serving.admission.store import Store

POLICIES = {"acme": {"tokens_per_day": 10_000_000}, "beta": {"tokens_per_day": 10_000_000}}


class LedgerProcess:
    def __init__(self, path: str):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "serving.admission.stdio", path, json.dumps(POLICIES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert json.loads(self.p.stdout.readline())["ready"]

    def send(self, cmd: dict) -> None:
        self.p.stdin.write(json.dumps(cmd) + "\n")

    def ask(self, cmd: dict) -> dict:
        self.send(cmd)
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def read(self) -> dict:
        return json.loads(self.p.stdout.readline())

    def kill9(self) -> None:
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=10)
        assert self.p.returncode == -signal.SIGKILL


def persisted(path: str) -> dict[str, int]:
    s = Store(path)
    out = defaultdict(int)
    for tenant, scope, _, tokens in s.usage():
        if scope == "day":
            out[tenant] += tokens
    s.close()
    return dict(out)


def test_kill9_mid_load_then_restart_counts_each_request_once(tmp_path):
    rng = random.Random(7)
    path = str(tmp_path / "ledger.sqlite")
    led = LedgerProcess(path)
    reservations, used = [], []
    for i in range(400):
        ans = led.ask({"op": "reserve", "request_id": f"r{i}", "tenant": rng.choice(["acme", "beta"]),
                       "tokens": rng.randint(100, 2000), "session": rng.choice([None, "s"])})
        reservations.append(ans["reservation"])
        used.append(rng.randint(0, ans["reservation"]["tokens"]))
    for r, u in zip(reservations, used):  # a burst: the ledger is busy when it dies
        led.send({"op": "reconcile", "reservation": r, "used": u})
    led.p.stdin.flush()
    acked = [led.read() for _ in range(120)]
    assert all(a == {"ok": True, "charged": True} for a in acked)
    led.kill9()

    expected = defaultdict(int)
    for r, u in zip(reservations, used):
        expected[r["tenant"]] += u
    at_crash = persisted(path)
    # Settled in order: the file holds exactly the first k reconciles, k >= the 120 acknowledged.
    prefix = defaultdict(int)
    prefixes = [dict(prefix)]
    for r, u in zip(reservations, used):
        prefix[r["tenant"]] += u
        prefixes.append({t: v for t, v in prefix.items()})
    k = next(i for i, p in enumerate(prefixes) if {t: v for t, v in p.items() if v} ==
             {t: v for t, v in at_crash.items() if v})
    assert k >= 120

    led = LedgerProcess(path)  # restart: replay every reconcile, acknowledged or not
    answers = [led.ask({"op": "reconcile", "reservation": r, "used": u})
               for r, u in zip(reservations, used)]
    assert sum(a["charged"] for a in answers) == 400 - k  # the rest were already counted
    left = led.ask({"op": "remaining", "tenant": "acme"})["budget"]["budgets"][0]
    assert left["reserved"] == 0
    led.p.stdin.close()
    led.p.wait(timeout=10)
    assert persisted(path) == dict(expected)
