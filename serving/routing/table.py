"""The router's view of its replicas, as columns for vectorised scoring.

The router is the single writer. Membership changes rebuild the columns;
a snapshot or a booking updates one row. A routing decision reads the columns
and never writes them, so scorers stay pure.
"""

from __future__ import annotations

import math

import numpy as np

from serving.engines.profiles import EngineProfile
from serving.routing.latency_model import ReplicaPerf
from serving.types import ReplicaSnapshot

RATE_TAU_S = 5.0  # the time constant of the per-replica routing rate
DECODE_ALPHA = 0.05  # EWMA weight of one request's decode lifetime


class ReplicaTable:
    # Per-row state the router accumulates (not derived from snapshots): kept across membership changes.
    _COUNTERS = ("outstanding", "booked_tokens", "rate", "rate_t", "decode_s")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.snaps: list[ReplicaSnapshot] = []
        self.perf: list[ReplicaPerf] = []
        self.regions: list[str] = []
        self._region_masks: dict[frozenset[str] | str, np.ndarray] = {}
        self._model_masks: dict[str, np.ndarray] = {}
        n = 0
        self.routable = np.zeros(n, bool)
        self.outstanding = np.zeros(n, np.int64)  # routed by us, not finished
        self.booked_tokens = np.zeros(n, np.int64)  # routed, prefill not seen by the engine yet
        # Requests per second routed here: a decaying count (time constant RATE_TAU_S),
        # as of `rate_t`. See routed() and route_rate().
        self.rate = np.zeros(n)
        self.rate_t = np.zeros(n)
        self.decode_s = np.zeros(n)  # EWMA of first token -> end of requests that ended well; 0: none yet
        self._first_routed: float | None = None
        self.num_waiting = np.zeros(n, np.int64)
        self.kv_usage = np.zeros(n)
        self.kv_free = np.zeros(n)  # KV tokens free once the queue ahead is admitted (may be < 0)
        self.kv_used = np.zeros(n)  # KV tokens running sequences hold
        self.queue_ms = np.zeros(n)
        self.step0_ms = np.zeros(n)  # scaled cost of one step at current batch
        self.b_ms = np.zeros(n)  # scaled per-token prefill cost
        self.budget = np.ones(n)

    def __len__(self) -> int:
        return len(self.ids)

    # --- membership -------------------------------------------------------
    def upsert(self, snap: ReplicaSnapshot, profile: EngineProfile) -> bool:
        """Store a snapshot; returns True when membership changed."""
        i = self.index.get(snap.replica_id)
        if i is None:
            self.ids.append(snap.replica_id)
            self.snaps.append(snap)
            self.perf.append(ReplicaPerf(profile))
            self._rebuild()
            return True
        old = self.snaps[i]
        self.snaps[i] = snap
        if old.region != snap.region or old.model != snap.model:
            self._rebuild()
        else:
            self.refresh(i)
        return False

    def remove(self, replica_id: str) -> bool:
        i = self.index.get(replica_id)
        if i is None:
            return False
        for seq in (self.ids, self.snaps, self.perf):
            del seq[i]
        keep = np.ones(len(self.outstanding), bool)
        keep[i] = False
        for name in self._COUNTERS:
            setattr(self, name, getattr(self, name)[keep])
        self._rebuild(keep_counters=True)
        return True

    def _rebuild(self, keep_counters: bool = False) -> None:
        n = len(self.ids)
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.regions = [s.region for s in self.snaps]
        if not keep_counters:  # rows keep their place: carry the counters over, zero the new rows
            m = min(n, len(self.outstanding))
            for name in self._COUNTERS:
                old = getattr(self, name)
                new = np.zeros(n, old.dtype)
                new[:m] = old[:m]
                setattr(self, name, new)
        self.routable = np.zeros(n, bool)
        self.num_waiting = np.zeros(n, np.int64)
        self.kv_usage = np.zeros(n)
        self.kv_free = np.zeros(n)
        self.kv_used = np.zeros(n)
        self.queue_ms = np.zeros(n)
        self.step0_ms = np.zeros(n)
        self.b_ms = np.zeros(n)
        self.budget = np.ones(n)
        self._region_masks.clear()
        self._model_masks.clear()
        for i in range(n):
            self.refresh(i)

    # --- rows ---------------------------------------------------------------
    def refresh(self, i: int) -> None:
        """Recompute row i's derived columns from its snapshot, perf and bookings."""
        s, perf = self.snaps[i], self.perf[i]
        queued = s.waiting_prefill_tokens + int(self.booked_tokens[i])
        self.routable[i] = s.routable
        self.num_waiting[i] = s.num_waiting
        self.kv_usage[i] = s.kv_usage
        cap = s.kv_capacity_tokens
        used = s.kv_usage * cap
        self.kv_free[i] = cap - used - queued if cap > 0 else math.inf
        self.kv_used[i] = used
        self.queue_ms[i] = perf.queue_ms(queued, s.num_running, s.num_waiting)
        self.step0_ms[i] = perf.step0_ms(s.num_running) * perf.scale
        self.b_ms[i] = perf.profile.b_ms_per_token * perf.scale
        self.budget[i] = perf.profile.max_num_batched_tokens

    # --- arrival rate ----------------------------------------------------------
    def routed(self, i: int, now: float) -> None:
        """One more request routed to row i at `now`."""
        if self._first_routed is None:
            self._first_routed = now
        self.rate[i] = self.rate[i] * math.exp(min(0.0, self.rate_t[i] - now) / RATE_TAU_S) + 1.0 / RATE_TAU_S
        self.rate_t[i] = now

    def decoded(self, i: int, seconds: float) -> None:
        """A request on row i ended well `seconds` after its first token."""
        d = self.decode_s[i]
        self.decode_s[i] = seconds if d == 0 else d + DECODE_ALPHA * (seconds - d)

    def route_rate(self, rows: np.ndarray, now: float) -> np.ndarray:
        """Requests per second routed to `rows` lately (decayed to `now`).

        In the router's first seconds the decayed count has not filled up yet: it is
        divided by the part of it that has (1 - e^(-age/tau)), or a fleet starting
        under full load would read as idle, exactly when its caches are cold (the age
        counts from at least 1 s, so the first requests do not read as a huge rate)."""
        rate = self.rate[rows] * np.exp(np.minimum(0.0, self.rate_t[rows] - now) / RATE_TAU_S)
        if self._first_routed is None:
            return rate
        return rate / -math.expm1(-max(1.0, now - self._first_routed) / RATE_TAU_S)

    # --- masks (cached until membership changes) ----------------------------
    def model_mask(self, model: str) -> np.ndarray:
        m = self._model_masks.get(model)
        if m is None:
            m = np.fromiter((s.model == model for s in self.snaps), bool, len(self.snaps))
            self._model_masks[model] = m
        return m

    def region_mask(self, regions: frozenset[str]) -> np.ndarray:
        m = self._region_masks.get(regions)
        if m is None:
            m = np.fromiter((r in regions for r in self.regions), bool, len(self.regions))
            self._region_masks[regions] = m
        return m

    def rtt_row(self, client_region: str, rtt_ms: dict[str, dict[str, float]]) -> np.ndarray:
        key = "rtt:" + client_region
        m = self._region_masks.get(key)
        if m is None:
            row = rtt_ms.get(client_region, {})
            m = np.fromiter((float(row.get(r, 0.0)) for r in self.regions), float, len(self.regions))
            self._region_masks[key] = m
        return m
