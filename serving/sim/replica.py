"""A simulated replica in virtual time: SimCore plus lazy decode runs.

Between arrivals and completions a batch that only decodes repeats the same
step, so instead of one event per token the replica plans a *run*: k
identical decode steps of d ms from t0 (k = tokens left to the first
sequence to finish, bounded by free KV blocks), with one event at t0 + k*d.
Nothing is committed to the core until the run ends or a new request
arrives; an arrival at t commits only the steps that started before t
(ceil((t - t0) / d)), so the newcomer joins at the next step boundary, as
it would in vLLM. The committed steps are exactly what SimCore would have
done one by one (same scheduler, same step-time model), so jumping changes
speed, not results.

States: idle; `STEP` (one computed step in flight, its result delivered at
`t_end`); `RUN` (a planned decode run).
"""

from __future__ import annotations

from serving.engines.profiles import EngineProfile
from serving.engines.sim_core import SimCore, StepResult
from serving.types import Health, ReplicaSnapshot

IDLE, STEP, RUN = 0, 1, 2
_EMPTY = StepResult(0.0, 0, 0, 0, [], [])


class Replica:
    __slots__ = ("id", "region", "model", "profile", "core", "health", "state", "t_end",
                 "version", "res", "t0", "d", "k", "dirty", "busy_s", "kv_capacity", "born", "died", "jumps")

    def __init__(self, replica_id: str, region: str, model: str, profile: EngineProfile,
                 kv_capacity_tokens: int, jumps: bool = True):
        self.jumps = jumps  # False: one event per step (slow; for checking that jumps are exact)
        self.id, self.region, self.model, self.profile = replica_id, region, model, profile
        self.kv_capacity = kv_capacity_tokens
        self.core = SimCore(profile, kv_capacity_tokens)
        self.health = Health.UP
        self.state = IDLE
        self.t_end = 0.0
        self.version = 0  # bumps invalidate this replica's pending end-of-step event
        self.res: StepResult = _EMPTY
        self.t0 = self.d = 0.0
        self.k = 0
        self.dirty = True  # changed since the last snapshot
        self.busy_s = 0.0  # seconds spent stepping
        self.born = 0.0  # when it joined (replica-hours count from here)
        self.died: float | None = None  # when an autoscaler stopped it (replica-hours end here)

    def plan(self, t: float) -> float | None:
        """The replica is free at t: plan its next step or run; returns when it ends."""
        core = self.core
        self.dirty = True
        if not core.waiting and not core.running:
            self.state = IDLE
            return None
        k = self._run_len() if self.jumps else 0
        if k >= 2:
            self.state, self.t0, self.k = RUN, t, k
            self.d = self.profile.step_ms(0, len(core.running)) / 1000.0
            self.t_end = t + k * self.d
        else:
            self.state = STEP
            self.res = core.step()
            self.t0 = t
            self.t_end = t + self.res.duration_ms / 1000.0
        self.busy_s += self.t_end - t
        return self.t_end

    def finish(self) -> StepResult:
        """At t_end: the result to deliver (a planned run is committed now)."""
        if self.state == RUN:
            res = self.core.step(max_steps=self.k)
            assert res.steps == self.k, "a planned run must replay exactly"
            return res
        return self.res

    def interrupt(self, t: float) -> float:
        """A request arrives at t during a run: commit the steps begun before t.

        Returns the new end time (the boundary at which the newcomer joins)."""
        j = max(1, min(self.k, -int(-(t - self.t0) // self.d) if self.d > 0 else self.k))
        res = self.core.step(max_steps=j)
        assert res.steps == j, "a planned run must replay exactly"
        end = self.t0 + j * self.d
        self.busy_s -= self.t_end - end
        self.state, self.res, self.t_end = STEP, res, end
        self.version += 1
        return end

    def _step_left(self, now: float) -> float:
        """Fraction of the computed step in flight still to run at `now` (0 when none)."""
        if self.state != STEP or self.t_end <= self.t0:
            return 0.0
        return (self.t_end - now) / (self.t_end - self.t0)

    def _run_len(self) -> int:
        """Length of the identical decode-only run the core would do next (0: none)."""
        core = self.core
        running = core.running
        if not running:
            return 0
        k = 1 << 30
        for s in running:
            if s.computed < s.prompt_len:
                return 0  # a partial prefill: the next step is not decode-only
            left = s.max_tokens - s.out
            if left < k:
                k = left
        if k < 2:
            return 0
        p = self.profile
        pool, bs = core.pool, core.bs
        if core.waiting and len(running) < p.max_num_seqs:
            head = core.waiting[0]
            hit = core.hit_blocks(head)
            if pool.can_allocate(-(-head.prompt_len // bs) - hit, head.hashes[:hit]):
                return 0  # the head can be admitted: the next step prefills
        need = 0
        for s in running:
            extra = -(-(s.prompt_len + s.out + k) // bs) - len(s.held) - s.anon
            if extra > 0:
                need += extra
        return k if need <= pool.num_free else 0

    def snapshot(self, now: float) -> ReplicaSnapshot:
        c = self.core
        self.dirty = False
        return ReplicaSnapshot(
            self.id, self.region, self.model, num_running=len(c.running), num_waiting=len(c.waiting),
            waiting_prefill_tokens=c.pending_at(self.res.prefill_tokens, self._step_left(now)), kv_capacity_tokens=c.kv_capacity_tokens,
            kv_usage=c.pool.usage, prefix_cache_queries=c.queries, prefix_cache_hits=c.hits,
            health=self.health, profile=self.profile.name, timestamp=now)
