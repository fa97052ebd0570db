"""The ledger's SQLite file: usage totals, open reservations, settled request ids.

WAL mode with synchronous=NORMAL: every commit is in the WAL before `commit()`
returns, so a killed process (kill -9) loses nothing that was acknowledged; only
an OS crash or power loss could lose the last commits (use synchronous=FULL for
that, at an fsync per request). One connection, one writer: the ledger.

Exactly-once settlement: `settle` inserts the request id into `settled` in the
same transaction that adds its usage, so a reconcile retried after a crash (the
caller never saw the answer) is recognised and not counted twice.
"""

from __future__ import annotations

import sqlite3
from typing import Iterator

from serving.admission.budget import Reservation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (tenant, scope, key));
CREATE TABLE IF NOT EXISTS reservations (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session TEXT, day TEXT NOT NULL,
    tokens INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settled (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, used INTEGER NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS settled_at ON settled (at);
"""

_ADD = ("INSERT INTO usage (tenant, scope, key, tokens) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (tenant, scope, key) DO UPDATE SET tokens = tokens + excluded.tokens")


class Store:
    def __init__(self, path: str, busy_timeout_s: float = 1.0):
        self.path = path
        # a file another process holds locked fails a write after busy_timeout_s (a reservation:
        # a 503 to retry), not sqlite3's 5 s default on every call
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        if path != ":memory:":
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"ledger: SQLite refused WAL mode for {path} (got {mode})")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- reads, at start-up -------------------------------------------------
    def usage(self) -> Iterator[tuple[str, str, str, int]]:
        yield from self.db.execute("SELECT tenant, scope, key, tokens FROM usage")

    def reservations(self) -> Iterator[tuple[Reservation, float]]:
        for rid, tenant, session, day, tokens, created in self.db.execute(
                "SELECT request_id, tenant, session, day, tokens, created FROM reservations"):
            yield Reservation(rid, tenant, tokens, day, session), created

    def is_settled(self, request_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM settled WHERE request_id = ?",
                               (request_id,)).fetchone() is not None

    # --- writes -------------------------------------------------------------
    def hold(self, r: Reservation, now: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO reservations VALUES (?, ?, ?, ?, ?, ?)",
                        (r.request_id, r.tenant, r.session, r.day, r.tokens, now))

    def touch(self, request_ids: list[str], now: float) -> None:
        """Holds whose requests are still running: their TTL counts from `now`."""
        self.db.executemany("UPDATE reservations SET created = ? WHERE request_id = ?",
                            [(now, i) for i in request_ids])

    def drop(self, request_ids: list[str]) -> None:
        self.db.executemany("DELETE FROM reservations WHERE request_id = ?",
                            [(i,) for i in request_ids])

    def settle(self, r: Reservation, used: int, now: float) -> bool:
        """Charge `used` once; False if this request was already settled."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute("INSERT OR IGNORE INTO settled VALUES (?, ?, ?, ?)",
                             (r.request_id, r.tenant, used, now))
            if cur.rowcount == 0:
                db.execute("ROLLBACK")
                return False
            db.execute("DELETE FROM reservations WHERE request_id = ?", (r.request_id,))
            db.execute(_ADD, (r.tenant, "day", r.day, used))
            if r.session is not None:
                db.execute(_ADD, (r.tenant, "session", r.session, used))
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def prune_settled(self, before: float) -> int:
        """Forget settled ids older than `before` (a reconcile can't arrive that late)."""
        return self.db.execute("DELETE FROM settled WHERE at < ?", (before,)).rowcount
