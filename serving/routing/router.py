"""The router: candidates -> filters -> scores -> pick, and the lifecycle hooks.

It owns the prefix index, the replica table (load view) and the per-replica
latency models; it is their only writer. `choose` is pure; `route` is
`choose` followed by the `on_routed` hook. Engines push snapshots with
`update`; the dispatcher reports `on_first_token` and `on_finished`.
The clock is injected so the discrete-event simulator can run it in virtual time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from serving.engines.profiles import EngineProfile, get_profile
from serving.prefix import PrefixIndex
from serving.routing import filters
from serving.routing.policies import Context, Policy, make_policy
from serving.routing.table import ReplicaTable
from serving.types import Decision, ReplicaSnapshot, RouteRequest, TTFTParts


@dataclass(slots=True)
class _InFlight:
    row_id: str
    booked_tokens: int  # uncached prompt tokens this request adds to the replica's queue
    routed_at: float
    predicted_engine_ms: float
    first_token: bool = False
    first_at: float = 0.0


KV_WAIT_MAX_MS = 60_000.0  # a predicted wait for KV is capped here (a replica with nothing running)


class Router:
    def __init__(self, policy: str | Policy = "latency", *, block_size: int = 16,
                 rtt_ms: dict[str, dict[str, float]] | None = None,
                 default_profile: str | EngineProfile = "llama3-8b-h100",
                 seed: int | None = None, clock: Callable[[], float] = time.monotonic,
                 report_lag_s: float = 0.05, alternatives: int = 3, **policy_options):
        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, **policy_options)
        self.index = PrefixIndex(block_size)
        self.table = ReplicaTable()
        self.rtt_ms = {k: dict(v) for k, v in (rtt_ms or {}).items()}
        self.default_profile = (default_profile if isinstance(default_profile, EngineProfile)
                                else get_profile(default_profile))
        self.rng = np.random.default_rng(seed)
        self.clock = clock
        self.report_lag_s = report_lag_s
        self.n_alternatives = alternatives
        self._inflight: dict[str, _InFlight] = {}
        # replica -> its in-flight requests still before their first token (what a
        # snapshot recount looks at), so a snapshot costs O(its own), not O(all).
        self._unprefilled: dict[str, dict[str, _InFlight]] = {}
        self._received: dict[str, float] = {}

    @property
    def block_size(self) -> int:
        return self.index.block_size

    # --- engines report --------------------------------------------------
    def update(self, snap: ReplicaSnapshot) -> None:
        """Take an engine's load snapshot (adds the replica if it is new)."""
        table = self.table
        prev = table.snaps[table.index[snap.replica_id]] if snap.replica_id in table.index else None
        if prev is not None and prev.circuit_open and not snap.circuit_open:
            snap = replace(snap, circuit_open=True)  # the circuit is ours to close
        profile = get_profile(snap.profile) if snap.profile else self.default_profile
        if table.upsert(snap, profile):
            self.policy.on_membership(table.ids)
        self.index.add_replica(snap.replica_id, snap.kv_capacity_tokens)
        now = self.clock()
        self._received[snap.replica_id] = now
        self._recount_booked(snap.replica_id, now)

    def remove(self, replica_id: str) -> None:
        """A replica went away: forget its blocks, its load and its bookings."""
        if self.table.remove(replica_id):
            self.policy.on_membership(self.table.ids)
        self.index.remove_replica(replica_id)
        self._received.pop(replica_id, None)
        for rid in [r for r, f in self._inflight.items() if f.row_id == replica_id]:
            del self._inflight[rid]
        self._unprefilled.pop(replica_id, None)

    def set_circuit(self, replica_id: str, open_: bool) -> None:
        i = self.table.index.get(replica_id)
        if i is not None:
            self.table.snaps[i] = replace(self.table.snaps[i], circuit_open=open_)
            self.table.refresh(i)

    def set_rtt(self, rtt_ms: dict[str, dict[str, float]]) -> None:
        self.rtt_ms = {k: dict(v) for k, v in rtt_ms.items()}
        self.table._region_masks.clear()

    # --- deciding ---------------------------------------------------------
    def context(self, req: RouteRequest) -> Context:
        table = self.table
        cands = filters.candidates(table, req)
        cached = np.zeros(cands.size, np.int64)
        if req.block_hashes:
            matches = self.index.match(req.block_hashes)
            if matches:  # scatter by table row, gather the candidates: O(matches) in Python
                full = np.zeros(len(table), np.int64)
                index = table.index
                for rid, n in matches.items():
                    i = index.get(rid)
                    if i is not None:
                        full[i] = n
                cached = full[cands]
        uncached = np.maximum(1, req.prompt_tokens - cached * self.index.block_size)
        steps = np.maximum(1, np.ceil(uncached / table.budget[cands]))
        prefill = steps * table.step0_ms[cands] + table.b_ms[cands] * uncached
        rtt = table.rtt_row(req.client_region, self.rtt_ms)[cands]
        queue = table.queue_ms[cands]
        now = self.clock()
        # A replica whose free KV cannot take the queue ahead plus this prompt admits it
        # only as running requests end: they free the KV they hold over about one decode
        # lifetime (first token -> end, learnt from requests that ended), so the prompt
        # waits (tokens short) / (KV held / lifetime), or for the queue's compute if longer.
        short = uncached - table.kv_free[cands]
        if short.max() > 0:
            queue = queue.copy()
            sub = np.flatnonzero((short > 0) & (table.decode_s[cands] > 0))
            rows = cands[sub]
            release = table.kv_used[rows] / table.decode_s[rows]  # tokens/s
            wait = np.minimum(short[sub] * 1000.0 / np.maximum(release, 1.0), KV_WAIT_MAX_MS)
            queue[sub] = np.maximum(queue[sub], wait)
        return Context(req, table, cands, cached, self.index.block_size, rtt,
                       queue, prefill, self.rng, rtt + queue + prefill, now)

    def choose(self, req: RouteRequest) -> tuple[Decision, Context, int]:
        ctx = self.context(req)
        pos, reason = self.policy.choose(ctx)
        i = int(ctx.cands[pos])
        alts: tuple[str, ...] = ()
        if self.n_alternatives and ctx.cands.size > 1:
            order = np.argsort(ctx.ttft_ms, kind="stable")[: self.n_alternatives + 1]
            ids = self.table.ids
            alts = tuple([ids[c] for c in ctx.cands[order].tolist() if c != i][: self.n_alternatives])
        parts = TTFTParts(float(ctx.rtt_ms[pos]), float(ctx.queue_ms[pos]), float(ctx.prefill_ms[pos]))
        cached = min(int(ctx.cached_blocks[pos]) * self.index.block_size, req.prompt_tokens)
        decision = Decision(req.request_id, self.table.ids[i], self.table.regions[i], self.policy.name,
                            parts, cached, reason, int(ctx.cands.size), alts)
        return decision, ctx, pos

    def route(self, req: RouteRequest) -> Decision:
        decision, ctx, pos = self.choose(req)
        self.on_routed(req, decision, ctx, pos)
        return decision

    # --- lifecycle hooks ----------------------------------------------------
    def on_routed(self, req: RouteRequest, decision: Decision, ctx: Context | None = None,
                  pos: int | None = None) -> None:
        if ctx is not None and pos is not None:
            self.policy.on_routed(ctx, pos)
        rid = decision.replica_id
        i = self.table.index[rid]
        booked = max(1, req.prompt_tokens - decision.cached_tokens)
        self.index.book(req.request_id, rid, req.block_hashes)
        f = self._inflight[req.request_id] = _InFlight(
            rid, booked, ctx.now if ctx is not None else self.clock(),
            decision.predicted.queue_ms + decision.predicted.prefill_ms)
        self._unprefilled.setdefault(rid, {})[req.request_id] = f
        self.table.outstanding[i] += 1
        self.table.booked_tokens[i] += booked
        self.table.routed(i, f.routed_at)
        self.table.refresh(i)

    def on_first_token(self, request_id: str, engine_ttft_ms: float | None = None) -> None:
        """Prefill is done: the request no longer queues ahead of others."""
        f = self._inflight.get(request_id)
        if f is None or f.first_token:
            return
        f.first_token = True
        f.first_at = self.clock()
        pending = self._unprefilled.get(f.row_id)
        if pending is not None:
            pending.pop(request_id, None)
        i = self.table.index.get(f.row_id)
        if i is None:
            return
        if f.routed_at >= self._received.get(f.row_id, 0.0) - self.report_lag_s:
            self.table.booked_tokens[i] = max(0, int(self.table.booked_tokens[i]) - f.booked_tokens)
        if engine_ttft_ms is not None:
            self.table.perf[i].observe(f.predicted_engine_ms, engine_ttft_ms)
        self.table.refresh(i)

    def on_finished(self, request_id: str, ok: bool = True) -> None:
        """The request ended (ok, or failed/aborted: then its guessed blocks are taken back)."""
        f = self._inflight.get(request_id)
        timed = f is not None and f.first_token  # its first token was reported before its end
        self.on_first_token(request_id)
        f = self._inflight.pop(request_id, None)
        self.index.release(request_id, succeeded=ok)
        if f is None:
            return
        i = self.table.index.get(f.row_id)
        if i is not None:
            if ok and timed:
                self.table.decoded(i, self.clock() - f.first_at)
            self.table.outstanding[i] = max(0, self.table.outstanding[i] - 1)
            self.table.refresh(i)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # --- internals --------------------------------------------------------
    def _recount_booked(self, replica_id: str, now: float) -> None:
        """After a snapshot, count only bookings the engine could not have seen yet."""
        i = self.table.index[replica_id]
        cutoff = now - self.report_lag_s
        booked = sum(f.booked_tokens for f in self._unprefilled.get(replica_id, {}).values()
                     if f.routed_at >= cutoff)
        if booked != self.table.booked_tokens[i]:  # upsert already refreshed the row
            self.table.booked_tokens[i] = booked
            self.table.refresh(i)
