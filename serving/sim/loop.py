"""The discrete-event loop: arrivals -> (hooks) -> the real Router -> simulated replicas.

Virtual time in seconds; the Router runs with `clock=lambda: sim.now`, so it
is the production router, booking, hooks and all. Events live in one heap:
end of a replica's step or planned run, periodic snapshot pushes (each
replica its own phase, as engines push), scenario events (outages), samples
of queue depth. Arrivals are a sorted stream merged with the heap, never
pushed into it.

Stages other helpers own plug in through `Hooks` (admission, delegation, an
autoscaler tick) without touching this loop. A crashed replica's requests are
re-routed up to `max_retries` times (the dispatcher's retry); a request that
cannot be placed or never completes by `duration_s + drain_s` is failed.
"""

from __future__ import annotations

import heapq
import random
import sys
from dataclasses import replace
from typing import Callable, Iterable

from serving.engines.profiles import get_profile
from serving.engines.sim_core import Seq
from serving.errors import ProximaError
from serving.routing import Router
from serving.sim.content import Hasher
from serving.sim.metrics import Recorder
from serving.sim.replica import IDLE, RUN, Replica
from serving.sim.scenario import PolicySpec, Scenario
from serving.sim.workload import Arrival, arrivals
from serving.types import Health, RouteRequest

END, SNAP, EVENT, SAMPLE, TICK, CALL = 0, 1, 2, 3, 4, 5


class Hooks:
    """Seams for the admission, delegation and autoscaling stages (defaults: pass-through)."""

    tick_s: float = 0.0  # > 0: call tick() this often (an autoscaler's control loop)

    def admit(self, sim: "Simulator", a: Arrival) -> str | None:
        """Return a reason to reject the request (it is counted as failed), or None."""
        return None

    def delegate(self, sim: "Simulator", a: Arrival) -> str:
        """The model that serves the request (delegation may pick a smaller one)."""
        return a.model

    def tick(self, sim: "Simulator", now: float) -> None:
        """Periodic control loop: may call sim.add_replica / sim.crash / sim.recover."""


class Req:
    __slots__ = ("n", "a", "rtt_s", "t_first", "out_done", "tries", "replica", "rid", "hashes")

    def __init__(self, n: int, a: Arrival, rtt_s: float, hashes: tuple):
        self.n, self.a, self.rtt_s, self.hashes = n, a, rtt_s, hashes
        self.t_first = -1.0
        self.out_done = 0  # tokens already streamed before a failover
        self.tries = 0
        self.replica: Replica | None = None
        self.rid = f"q{n}"


class Simulator:
    def __init__(self, sc: Scenario, policy: PolicySpec, *, hooks: Hooks | None = None,
                 progress: bool = False, sample_s: float | None = None,
                 stream: Iterable[Arrival] | None = None, hasher: Hasher | None = None,
                 jumps: bool = True):
        self.sc = sc
        self.jumps = jumps
        self.now = 0.0
        self.hooks = hooks or Hooks()
        self.progress = progress
        first = next(iter(sc.regions.values()))
        bs = get_profile(first.profile).block_size
        self.router = Router(policy.policy, block_size=bs, rtt_ms=sc.rtt_ms, default_profile=first.profile,
                             seed=sc.seed, clock=lambda: self.now, report_lag_s=0.0, alternatives=0,
                             **policy.options)
        self.label = policy.label
        self.hasher = hasher or Hasher(bs)
        self.rng = random.Random(sc.seed)
        self.replicas: dict[str, Replica] = {}
        self.heap: list = []
        self._seq = 0
        self.stream = iter(stream if stream is not None else arrivals(sc))
        self.rec = Recorder(sc)
        self.inflight = 0
        self.sample_s = sample_s or max(0.1, sc.duration_s / 300)
        self._rtt = {c: {s: v / 1000.0 for s, v in row.items()} for c, row in sc.rtt_ms.items()}
        for region in sc.regions.values():
            for _ in range(region.replicas):
                self.add_replica(region.name)
        for ev in sc.events:
            self._push(ev.at_s, EVENT, ev)
        self._push(0.0, SAMPLE, None)
        if self.hooks.tick_s > 0:
            self._push(self.hooks.tick_s, TICK, None)

    # --- operations (events and hooks call these) -----------------------------
    def add_replica(self, region: str) -> Replica:
        spec = self.sc.regions[region]
        n = sum(1 for r in self.replicas.values() if r.region == region)
        rep = Replica(f"{region}-{n}", region, spec.model, get_profile(spec.profile), spec.kv_capacity_tokens,
                      self.jumps)
        rep.born = self.now
        self.replicas[rep.id] = rep
        self.router.update(rep.snapshot(self.now))
        phase = self.rng.random() * self.sc.snapshot_interval_ms / 1000.0
        self._push(self.now + phase, SNAP, rep)
        return rep

    def at(self, t: float, fn: Callable[["Simulator", float], None]) -> None:
        """Call fn(sim, t) at virtual time t (a hook's own timer: a replica warm by then)."""
        self._push(max(t, self.now), CALL, fn)

    def crash(self, *reps: Replica) -> None:
        """Replicas die together: the router's circuits open, then their requests fail over."""
        victims = []
        for rep in reps:
            if rep.health is Health.DOWN:
                continue
            rep.health = Health.DOWN
            rep.version += 1
            rep.state = IDLE
            self.router.set_circuit(rep.id, True)
            victims += [(s.tag, s.out, rep.id) for s in list(rep.core.waiting) + rep.core.running]
            rep.core = type(rep.core)(rep.profile, rep.kv_capacity)  # the cache is lost too
        for r, streamed, rid in victims:
            self.router.on_finished(r.rid, ok=False)
            r.out_done += streamed
            r.tries += 1
            if r.tries > self.sc.max_retries:
                self._fail(r, "replica failed")
            else:
                self._route(r, exclude=frozenset((rid,)))

    def recover(self, rep: Replica) -> None:
        if rep.health is not Health.DOWN:
            return
        rep.health = Health.UP
        self.router.index.reset_replica(rep.id)
        self.router.update(rep.snapshot(self.now))
        self.router.set_circuit(rep.id, False)

    # --- the loop ---------------------------------------------------------------
    def run(self) -> dict:
        heap, pop = self.heap, heapq.heappop
        stream = self.stream
        nxt = next(stream, None)
        n = 0
        horizon = self.sc.duration_s + self.sc.drain_s
        report = self.sc.duration_s / 20
        next_report = report
        while True:
            if nxt is not None and (not heap or nxt.t < heap[0][0]):
                self.now = nxt.t
                self._arrive(n, nxt)
                n += 1
                nxt = next(stream, None)
                continue
            if nxt is None and self.inflight == 0:
                break
            t, _, kind, obj, ver = pop(heap)
            if t > horizon:
                self.now = horizon
                break
            self.now = t
            if kind == END:
                if ver == obj.version:
                    self._end(obj, t)
            elif kind == SNAP:
                if obj.died is not None:  # stopped by an autoscaler: it reports no more
                    continue
                if obj.dirty or obj.state == RUN:
                    self.router.update(obj.snapshot(t))
                self._push(t + self.sc.snapshot_interval_ms / 1000.0, SNAP, obj)
            elif kind == SAMPLE:
                self.rec.sample(t, self.replicas.values())
                self._push(t + self.sample_s, SAMPLE, None)
                if self.progress and t >= next_report:
                    print(f"[{self.label}] t={t:.0f}/{self.sc.duration_s:.0f}s requests={n} "
                          f"in flight={self.inflight}", file=sys.stderr, flush=True)
                    next_report += report
            elif kind == EVENT:
                self._event(obj)
            elif kind == TICK:
                self.hooks.tick(self, t)
                self._push(t + self.hooks.tick_s, TICK, None)
            elif kind == CALL:
                obj(self, t)
        for rep in self.replicas.values():  # still running at the horizon: failed
            for s in list(rep.core.waiting) + rep.core.running:
                self._fail(s.tag, "not finished by duration_s + drain_s")
        return self.rec.summary(self.now, list(self.replicas.values()))

    # --- stages ---------------------------------------------------------------
    def _arrive(self, n: int, a: Arrival) -> None:
        self.inflight += 1
        reason = self.hooks.admit(self, a)
        model = self.hooks.delegate(self, a)
        if model != a.model:
            a.model = model
        hashes = self.hasher.hashes(a.segments, a.prompt_len, a.model, a.tenant)
        r = Req(n, a, 0.0, hashes)
        if reason is not None:
            self._fail(r, reason)
            return
        self._route(r)

    def _route(self, r: Req, exclude: frozenset = frozenset()) -> None:
        a = r.a
        prompt = a.prompt_len + r.out_done  # a failover continues from what was streamed
        req = RouteRequest(r.rid, a.model, prompt, r.hashes, a.output_len - r.out_done,
                           a.region, None, a.tenant, a.session_id, a.slo_ttft_ms, exclude)
        try:
            d = self.router.route(req)
        except ProximaError as e:
            self._fail(r, type(e).__name__)
            return
        rep = self.replicas[d.replica_id]
        r.replica = rep
        r.rtt_s = self._rtt.get(a.region, {}).get(rep.region, 0.0)
        limit = min(rep.profile.max_model_len, rep.core.kv_capacity_tokens)
        if prompt + a.output_len - r.out_done > limit:
            self.router.on_finished(r.rid, ok=False)
            self._fail(r, "ContextLengthExceeded")
            return
        if rep.state == RUN:
            self._push(rep.interrupt(self.now), END, rep, rep.version)
        rep.core.add(Seq(r.rid, max(1, prompt), r.hashes, a.output_len - r.out_done, tag=r))
        rep.dirty = True
        if rep.state == IDLE:
            self._plan(rep, self.now)

    def _plan(self, rep: Replica, t: float) -> None:
        while True:
            try:
                end = rep.plan(t)
                break
            except ValueError:  # the head request can never fit this replica's KV cache
                s = rep.core.waiting.popleft()
                rep.core.pending_prefill -= s.prompt_len - s.computed
                self.router.on_finished(s.tag.rid, ok=False)
                self._fail(s.tag, "ContextLengthExceeded")
        if end is not None:
            rep.version += 1
            self._push(end, END, rep, rep.version)

    def _end(self, rep: Replica, t: float) -> None:
        res = rep.finish()
        router = self.router
        for s, k in res.emitted:
            if s.out == k:  # the first token of this placement
                r = s.tag
                if r.t_first < 0:
                    r.t_first = t
                router.on_first_token(r.rid, (t - r.a.t) * 1000.0 if r.tries == 0 else None)
        for s in res.finished:
            r = s.tag
            router.on_finished(r.rid)
            self.inflight -= 1
            self.rec.done(r, t, rep)
        self._plan(rep, t)

    def _fail(self, r: Req, reason: str) -> None:
        self.inflight -= 1
        self.rec.failed(r, reason)

    def _event(self, ev) -> None:
        reps = [r for r in self.replicas.values() if r.region == ev.region]
        if ev.action == "outage":
            reps = [r for r in reps if r.health is not Health.DOWN][: ev.replicas or len(reps)]
            self.crash(*reps)
            if ev.duration_s is not None:
                self._push(self.now + ev.duration_s, EVENT, _Recover(ev.region, tuple(reps)))
        elif isinstance(ev, _Recover):
            for rep in ev.reps:
                self.recover(rep)
        else:
            down = [r for r in reps if r.health is Health.DOWN][: ev.replicas or len(reps)]
            for rep in down:
                self.recover(rep)

    def _push(self, t: float, kind: int, obj, ver: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, obj, ver))


class _Recover:
    action = "recover"

    def __init__(self, region: str, reps: tuple):
        self.region, self.reps = region, reps


def run_policies(sc: Scenario, policies: list[PolicySpec] | None = None, *, progress: bool = False,
                 hooks_factory: Callable[[], Hooks] | None = None) -> dict:
    """Every policy on the identical arrivals; returns {"policies": {label: summary}}."""
    from serving.sim.metrics import oracle_hit_rate
    out: dict = {"scenario": sc.name, "policies": {}}
    hasher = Hasher(get_profile(next(iter(sc.regions.values())).profile).block_size)
    oracle = oracle_hit_rate(arrivals(sc), hasher)
    specs = policies or list(sc.policies)
    auto = sc.autoscaling  # autoscalers to compare: every policy runs under each
    for spec, variant in [(s, v) for s in specs for v in (auto.variants if auto else (None,))]:
        hooks = hooks_factory() if hooks_factory else None
        run_sc = sc
        if variant is not None:
            from serving.autoscaler.sim import make_hooks
            fleet = variant.options.get("replicas")
            if fleet:  # a static fleet of another size
                run_sc = replace(sc, regions={name: replace(r, replicas=fleet[name]) for name, r in sc.regions.items()})
            hooks = make_hooks(run_sc, auto, variant)
            spec = replace(spec, label=variant.name if len(specs) == 1 else f"{spec.label}+{variant.name}")
        sim = Simulator(run_sc, spec, hooks=hooks, progress=progress, hasher=hasher)
        res = sim.run()
        res["oracle_hit_rate"] = oracle
        series = sim.rec.series()
        res["by_client_region"] = series["by_client_region"]
        if variant is not None:
            res["autoscaler"] = {"kind": variant.kind, **hooks.stats()}
            series["autoscaler"] = hooks.series()
        out["policies"][spec.label] = res
        out.setdefault("_series", {})[spec.label] = series
    return out
