"""Circuit breakers per replica and per region: who may take new requests.

Replica breaker (closed -> open -> closed):
    opens  after `failures` consecutive failures (request attempts or health probes);
    closes after `recoveries` consecutive successful health probes, and no sooner
           than `cooldown_s` after it opened (a flapping replica stays out).
Region breaker:
    when every replica of one region has failed within `window_s` (each at least
    once, with no success since), they all open at once, without waiting for each
    one's `failures` threshold: a region outage is drained in one probe round. Each replica rejoins on its own probes; the region is back as soon as
    one of its replicas is.

The view is plain state with one writer (the health-check task or the
simulator); `changes` returns the circuits to push into the router with
`Router.set_circuit`, which filters open replicas out of every route.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 2
    recoveries: int = 2
    cooldown_s: float = 2.0
    window_s: float = 5.0
    half_open_after_s: float | None = None  # without probes: let one trial through after this


@dataclass(slots=True)
class _Replica:
    region: str
    open: bool = False
    fails: int = 0
    oks: int = 0
    opened_at: float = 0.0
    last_fail: float = float("-inf")
    last_ok: float = float("-inf")


@dataclass(slots=True)
class FailoverView:
    config: BreakerConfig = field(default_factory=BreakerConfig)
    replicas: dict[str, _Replica] = field(default_factory=dict)
    _dirty: dict[str, bool] = field(default_factory=dict)

    def add(self, replica_id: str, region: str) -> None:
        if replica_id not in self.replicas:
            self.replicas[replica_id] = _Replica(region)

    def remove(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)
        self._dirty.pop(replica_id, None)

    def retain(self, replica_ids) -> None:
        """Forget replicas the router no longer has (scaled down, or gone stale): a healthy
        one left behind would keep its region's breaker from ever seeing an outage."""
        for rid in [r for r in self.replicas if r not in replica_ids]:
            self.remove(rid)

    # --- observations -------------------------------------------------------
    def failure(self, replica_id: str, now: float) -> None:
        r = self.replicas.get(replica_id)
        if r is None:
            return
        r.fails, r.oks, r.last_fail = r.fails + 1, 0, now
        if not r.open and r.fails >= self.config.failures:
            self._open(replica_id, r, now)
        self._check_region(r.region, now)

    def success(self, replica_id: str, now: float, probe: bool = True) -> None:
        """A request or a probe went well. Only probes close an open circuit."""
        r = self.replicas.get(replica_id)
        if r is None:
            return
        r.fails, r.last_ok = 0, now
        if r.open and probe:
            r.oks += 1
            if r.oks >= self.config.recoveries and now - r.opened_at >= self.config.cooldown_s:
                r.open, r.oks = False, 0
                self._dirty[replica_id] = False

    def tick(self, now: float) -> None:
        """Half-open: where no probe runs, close a circuit open this long for a trial.

        One more failure reopens it at once (its failure count starts one short).
        """
        after = self.config.half_open_after_s
        if after is None:
            return
        for rid, r in self.replicas.items():
            if r.open and now - r.opened_at >= after:
                r.open, r.oks, r.fails = False, 0, max(0, self.config.failures - 1)
                self._dirty[rid] = False

    # --- reading ------------------------------------------------------------
    def is_open(self, replica_id: str) -> bool:
        r = self.replicas.get(replica_id)
        return r is not None and r.open

    def region_drained(self, region: str) -> bool:
        rs = [r for r in self.replicas.values() if r.region == region]
        return bool(rs) and all(r.open for r in rs)

    def changes(self) -> dict[str, bool]:
        """Circuits changed since the last call: replica id -> open."""
        out, self._dirty = self._dirty, {}
        return out

    # --- internals ----------------------------------------------------------
    def _open(self, replica_id: str, r: _Replica, now: float) -> None:
        r.open, r.opened_at, r.oks = True, now, 0
        self._dirty[replica_id] = True

    def _check_region(self, region: str, now: float) -> None:
        c = self.config
        members = [(rid, r) for rid, r in self.replicas.items() if r.region == region]
        if not all(now - r.last_fail <= c.window_s and r.last_fail >= r.last_ok
                   for _, r in members):
            return  # something in the region still answers: not an outage
        for rid, r in members:
            if not r.open:
                self._open(rid, r, now)
