"""The ledger as its own process, speaking JSON lines on stdin/stdout.

    python -m serving.admission.stdio LEDGER.sqlite '{"acme": {"tokens_per_day": 100000}}'

Each input line is one command, answered by one line, in order (one writer):

    {"op": "reserve", "request_id": "r1", "tenant": "acme", "tokens": 300, "session": null}
        -> {"ok": true, "reservation": {...}} | {"ok": false, "status": 429, "error": {...}}
    {"op": "reconcile", "reservation": {...}, "used": 120}  -> {"ok": true, "charged": true}
    {"op": "remaining", "tenant": "acme"}                   -> {"ok": true, "budget": {...}}

An answer is written only after its SQLite commit, so whatever a caller saw
acknowledged survives a kill -9. Used without Ray (and by the crash test).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from serving.admission.budget import BudgetPolicy, Reservation
from serving.admission.ledger import Ledger
from serving.errors import ProximaError


def handle(ledger: Ledger, cmd: dict) -> dict:
    op = cmd.get("op")
    try:
        if op == "reserve":
            r = ledger.reserve(cmd["request_id"], cmd["tenant"], cmd["tokens"], cmd.get("session"))
            return {"ok": True, "reservation": asdict(r)}
        if op == "reconcile":
            charged = ledger.reconcile(Reservation(**cmd["reservation"]), cmd["used"])
            return {"ok": True, "charged": charged}
        if op == "remaining":
            return {"ok": True, "budget": ledger.remaining(cmd["tenant"], cmd.get("session"))}
        return {"ok": False, "status": 400, "error": {"message": f"unknown op {op!r}"}}
    except ProximaError as e:
        return {"ok": False, "status": e.status, "error": e.body()["error"], "headers": e.headers}
    except (KeyError, TypeError, ValueError) as e:
        return {"ok": False, "status": 400, "error": {"message": f"bad command: {e!r}"}}


def main(argv: list[str]) -> None:
    path, policies = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    ledger = Ledger({t: BudgetPolicy.from_dict(p, f"budgets.{t}") for t, p in policies.items()},
                    path)
    out = sys.stdout
    out.write(json.dumps({"ok": True, "ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip():
            out.write(json.dumps(handle(ledger, json.loads(line))) + "\n")
            out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
