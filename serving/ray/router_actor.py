"""The central router as one Ray actor, and the async client the ingress uses.

One named actor owns serving.routing.Router (prefix index, load table,
latency models); it is their only writer because a synchronous actor runs one
call at a time. Engines push `update(snapshot, counters)` every
`router.snapshot_period_s`; the ingress calls `route` (awaited, never a
blocking ray.get) and tells it `first_token` and `finished` without waiting
for an answer. A replica that stops reporting for `router.stale_after_s` is
dropped, so a dead replica stops being chosen even if nobody said goodbye.

The actor is detached and named after a digest of the config, so every
replica of one deployment finds the same router, and a redeploy with a
different config gets a fresh one instead of stale state. The old one would
linger for good (a process of its own, with its index), so a router that no
engine has reported to for `router.idle_exit_s` (engines report every
`snapshot_period_s` while they live) kills itself without restart; anyone who
calls it later creates it again under the same name (`reconnect`). The
config's telemetry actor and memory-only budget ledger are named after the same
digest (`actor_name`) and would linger the same way: the exiting router takes
them with it, and their clients create them again should the app come back (a
memory-only ledger starts empty). A ledger kept in a file is one actor per file
(serving.ray.ledger.ledger_name), shared by every config that uses it (two
would each count only their own usage) and given the budgets of the config
deployed last; it stays. The digest leaves `auth` out (`shared_config`): the
engines, which are not given it, name the same actors.

Restarts. Ray restarts the actor when its process dies (max_restarts=-1);
the new incarnation starts empty and rebuilds its view from the engines'
next snapshots (one `snapshot_period_s` or two). For `rebuild_s` after it
starts (at least `stale_after_s`, the silence after which a replica counts
as gone), "no replica" answers RouterUnavailable instead of
NoReplicaAvailable, and RayRouter retries every call that met a dead,
restarting or rebuilding router (backoff up to `retry_s`), so requests in
routing wait out the restart instead of failing; streams already dispatched
never touch the router. A router gone for good (killed without restart) is
created afresh by the next caller (`reconnect`). Lost with a restart: the
prefix index (cache affinity is re-learned) and bookings of requests
already running (their `finished` events are ignored).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections import deque
from dataclasses import replace
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError

from serving.autoscaler.window import DemandWindow
from serving.config import load_config
from serving.errors import ModelNotFound, NoReplicaAvailable, ProximaError, RouterUnavailable
from serving.ingress.local import router_stats
from serving.ray import channel as chan
from serving.ray.named import find_again
from serving.routing.router import Router
from serving.types import Decision, Health, ReplicaSnapshot, RouteRequest

NAMESPACE = "proxima"
LEASE_S = 90.0  # a booking no ingress has said is live for this long is released (RouterActor)


@ray.remote(num_cpus=0, max_restarts=-1)
class RouterActor:
    def __init__(self, config: dict[str, Any]):
        cfg = load_config(config)
        self.config = config
        self.router = Router(cfg.router.policy, block_size=cfg.block_size, rtt_ms=cfg.rtt(),
                             alternatives=cfg.router.alternatives, **cfg.router.options)
        self.stale_after_s = cfg.router.stale_after_s
        self.counters: dict[str, dict[str, int]] = {}
        self.seen: dict[str, float] = {}
        self.route_us: deque[float] = deque(maxlen=4096)  # the actor's own time per decision
        self._swept = self.started = time.monotonic()
        # Engines re-report within a period or two, but on a busy machine later: a replica
        # counts as present until silent for stale_after_s, so "no replica" is not believed
        # sooner after a restart either (1 s here once let a 404 through in CI).
        self.rebuild_s = max(1.0, 5 * cfg.router.snapshot_period_s, self.stale_after_s)
        # The autoscaler's inputs: demand as routed, and the replicas it is draining.
        self.window = DemandWindow(cfg.autoscaler.window_s) if cfg.autoscaler else None
        self.draining: set[str] = set()
        self.first_seen: dict[str, float] = {}
        self._channel: tuple[str, int, bytes] | None = None
        self._channel_lock: asyncio.Lock | None = None
        self._server: chan.ChannelServer | None = None
        self.idle_exit_s = cfg.router.idle_exit_s
        self._last_report = time.monotonic()
        self._watchdog: asyncio.Task | None = None
        # Bookings are leased: an ingress says which of its requests are still live every
        # LEASE_S / 3 ("alive" events); one not heard of for LEASE_S is released. A request
        # whose ingress crashed (or whose routing call it gave up waiting for) would otherwise
        # stay booked on its replica for good, skewing every later decision.
        self.leased: dict[str, float] = {}
        self.leases_expired = 0
        self._lease_swept = time.monotonic()

    async def channel(self) -> tuple[str, int, bytes]:
        """Where the direct channel listens and its token (serving.ray.channel); started on first ask.

        Async (as `update` is): that makes this an async actor, so Ray's calls
        and the channel's run on one event loop, one at a time."""
        self._watch()  # (an ingress asks this first: a router no engine ever reports to exits too)
        if self._channel_lock is None:
            self._channel_lock = asyncio.Lock()
        async with self._channel_lock:
            if self._channel is None:
                host, token = ray.util.get_node_ip_address(), chan.new_token()
                self._server = await chan.serve(lambda method, args: getattr(self, method)(*args), host, token)
                self._channel = (host, self._server.port, token)
        return self._channel

    def _rebuilding(self, e: ProximaError) -> ProximaError:
        """Just (re)started and its view still partial: say so, so the caller waits instead of failing.

        Every "nothing to route to" answer (no replica, none in the allowed
        regions, no replica of the model at all) may only mean the engines have
        not reported yet; the ingress checked the model against the config.
        """
        if isinstance(e, (NoReplicaAvailable, ModelNotFound)) and \
                time.monotonic() - self.started < self.rebuild_s:
            return RouterUnavailable(f"The router is rebuilding its view after a restart: {e.message}")
        return e

    def route(self, req: RouteRequest) -> Decision | ProximaError:
        t = time.perf_counter()
        try:
            self._sweep()
            if self.window is not None and not req.exclude:  # a retry is not new demand
                self.window.arrival(time.monotonic(), req.client_region, req.model, req.prompt_tokens,
                                    req.max_tokens)
            d = self.router.route(req)
            self.leased[d.request_id] = time.monotonic()
            return d
        except ProximaError as e:  # errors travel as values: the caller raises our type
            return self._rebuilding(e)
        finally:
            self.route_us.append((time.perf_counter() - t) * 1e6)

    async def update(self, snap: ReplicaSnapshot, counters: dict[str, int] | None = None) -> None:
        # async only to start the watchdog on the actor's loop; nothing here awaits, so
        # it still runs whole between any other two calls
        self._last_report = time.monotonic()
        self._watch()
        if snap.replica_id in self.draining:
            snap = replace(snap, health=Health.DRAINING)
        self.router.update(snap)
        self.seen[snap.replica_id] = time.monotonic()
        self.first_seen.setdefault(snap.replica_id, self.seen[snap.replica_id])
        if counters is not None:
            self.counters[snap.replica_id] = counters

    def remove(self, replica_id: str) -> None:
        self.router.remove(replica_id)
        self.seen.pop(replica_id, None)
        self.draining.discard(replica_id)
        self.first_seen.pop(replica_id, None)
        self.counters.pop(replica_id, None)

    def first_token(self, request_id: str, engine_ttft_ms: float | None = None) -> None:
        self.router.on_first_token(request_id, engine_ttft_ms)

    def events(self, batch: list[tuple[str, str, Any]]) -> None:
        """Lifecycle hooks sent together: ("first", id, engine_ttft_ms) | ("done", id, ok) |
        ("alive", "", [ids]): an ingress's requests still running (their bookings' lease)."""
        r = self.router
        now = time.monotonic()
        for kind, request_id, arg in batch:
            if kind == "first":
                r.on_first_token(request_id, arg)
            elif kind == "alive":
                for rid in arg:
                    if rid in self.leased:
                        self.leased[rid] = now
            else:
                r.on_finished(request_id, arg)
                self.leased.pop(request_id, None)

    def finished(self, request_id: str, ok: bool = True) -> None:
        self.router.on_finished(request_id, ok)
        self.leased.pop(request_id, None)

    def predict(self, req: RouteRequest) -> float | ProximaError:
        """Dry run for delegation: the best replica's predicted TTFT, nothing booked."""
        try:
            self._sweep()
            return self.router.choose(req)[0].predicted_ttft_ms
        except ProximaError as e:
            return self._rebuilding(e)

    def set_circuit(self, replica_id: str, open_: bool) -> None:
        self.router.set_circuit(replica_id, open_)

    def drain(self, replica_ids: list[str]) -> None:
        """Route nothing new to these replicas (they are about to be stopped)."""
        table = self.router.table
        for rid in replica_ids:
            self.draining.add(rid)
            i = table.index.get(rid)
            if i is not None:
                self.router.update(replace(table.snaps[i], health=Health.DRAINING))

    def undrain(self, replica_ids: list[str]) -> None:
        """Serve stopped another replica than the one drained: this one serves again."""
        table = self.router.table
        for rid in replica_ids:
            self.draining.discard(rid)
            i = table.index.get(rid)
            if i is not None:
                self.router.update(replace(table.snaps[i], health=Health.UP))

    def autoscale_view(self) -> dict[str, Any]:
        """Demand over the window and every replica's load, for the autoscaler."""
        self._sweep()
        now = time.monotonic()
        table = self.router.table
        rows = []
        totals: dict[str, list[int]] = {}
        for i, rid in enumerate(table.ids):
            s = table.snaps[i]
            t = totals.setdefault(s.model, [0, 0])
            t[0] += s.prefix_cache_queries
            t[1] += s.prefix_cache_hits
            rows.append({"replica_id": rid, "region": s.region, "model": s.model,
                         "outstanding": int(table.outstanding[i]), "age_s": now - self.first_seen.get(rid, now),
                         "draining": rid in self.draining, "hits": s.prefix_cache_hits,
                         "kv_capacity_tokens": s.kv_capacity_tokens})
        demand = {}
        if self.window is not None:
            for model, (q, h) in totals.items():
                self.window.cache(now, model, q, h)
            demand = self.window.demand(now)
        return {"demand": demand, "replicas": rows}

    def stats(self) -> dict[str, Any]:
        self._sweep()
        out = router_stats(self.router, {r: {"counters": c} for r, c in self.counters.items()})
        out["router_uptime_s"] = round(time.monotonic() - self.started, 3)
        out["leases_expired"] = self.leases_expired  # bookings released for want of an ingress
        us = sorted(self.route_us)
        if us:
            out["route_us_p50"] = round(us[len(us) // 2], 1)
            out["route_us_p99"] = round(us[min(len(us) - 1, int(len(us) * 0.99))], 1)
        return out

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, int]:
        """What the router holds, for the soak: its structures' sizes and the
        interpreter's live allocations (they level off when nothing leaks)."""
        return {"allocated_blocks": sys.getallocatedblocks(), "index_entries": len(self.router.index),
                "index_bookings": self.router.index.booked, "inflight": self.router.inflight,
                "leased": len(self.leased)}

    def _watch(self) -> None:
        """Start the idle watchdog (from an async method: on the actor's loop)."""
        if self._watchdog is None and self.idle_exit_s > 0:
            self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        """Kill this actor (no restart) once no engine has reported for idle_exit_s."""
        while True:
            await asyncio.sleep(min(60.0, self.idle_exit_s / 4))
            idle = time.monotonic() - self._last_report
            if idle > self.idle_exit_s:
                print(f"proxima router: no engine reported for {idle:.0f} s (router.idle_exit_s "
                      f"{self.idle_exit_s:g}): exiting, with this config's ledger and telemetry actors",
                      file=sys.stderr, flush=True)
                for kind in ("ledger", "telemetry"):
                    try:
                        ray.kill(ray.get_actor(actor_name(kind, self.config), namespace=NAMESPACE),
                                 no_restart=True)
                    except ValueError:  # never started (no budgets asked, no ingress)
                        pass
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < 0.5:
            return
        self._swept = now
        for rid, t in list(self.seen.items()):
            if now - t > self.stale_after_s:
                self.remove(rid)
        if now - self._lease_swept >= 1.0:
            self._lease_swept = now
            for request_id in [q for q, t in self.leased.items() if now - t > LEASE_S]:
                del self.leased[request_id]
                self.router.on_finished(request_id, False)
                self.leases_expired += 1


def shared_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config every part but the ingress gets: without `auth` (tenants, their keys' hashes,
    the cache-salt key). Serve writes a deployment's arguments to its controller's log, and
    engines, the autoscaler and the router have no use for them."""
    return {k: v for k, v in config.items() if k != "auth"}


def config_digest(config: dict[str, Any]) -> str:
    """Names a config's shared actors: over `shared_config`, so the ingress (which has `auth`)
    and the engines (which do not) name the same ones, and rotating a key keeps the router."""
    return hashlib.sha256(json.dumps(shared_config(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


def actor_name(kind: str, config: dict[str, Any]) -> str:
    """The name of one of a config's shared actors: "router", "ledger" or "telemetry"."""
    return f"proxima-{kind}-{config_digest(config)}"


def router_actor(config: dict[str, Any]):
    """The router actor for this config, created by whichever replica asks first."""
    return RouterActor.options(name=actor_name("router", config), namespace=NAMESPACE,
                               get_if_exists=True, lifetime="detached").remote(shared_config(config))


class RayRouter:
    """RouterPort over the actor: awaited calls for answers, batched fire-and-forget hooks.

    Calls that meet a dead or restarting actor, or a router still rebuilding
    its view, are retried with backoff for up to `retry_s` (then
    RouterUnavailable, 503); after any error but "temporarily unavailable"
    the named actor is looked up (or created, if it is gone for good) again
    through `reconnect`. Hooks lost in a restart only cost bookings.

    first_token/finished are buffered for up to `flush_s` and sent as one
    `events` call: under load that turns two actor calls per request into a
    fraction of one, and the router learns of them a few ms later, well inside
    the engines' own snapshot period. Over the direct channel a routing call
    first sends what is buffered (a frame, no round trip), so a decision never
    misses a finish this ingress already saw.

    Calls go over the actor's direct channel (serving.ray.channel) once it is
    open: it is opened in the background on first use, so no request waits
    for it, and while it is not open (not yet, or lost with a router
    restart: reopened at most every `channel_retry_s`, backing off to once a
    minute while opening fails) every call takes the Ray path above, retries
    included. A channel call unanswered for `channel_timeout_s` closes the
    channel and goes over Ray (a router that slow is rare; one whose node
    vanished without closing the connection would otherwise hang the call).
    """

    def __init__(self, handle, flush_s: float = 0.005, reconnect: Callable[[], Any] | None = None,
                 retry_s: float = 20.0, channel: bool = True, channel_retry_s: float = 1.0,
                 channel_timeout_s: float = 5.0, lease_every_s: float = LEASE_S / 3):
        self.handle = handle
        # this ingress's requests routed and not finished: said to be alive every lease_every_s
        self.live: set[str] = set()
        self.lease_every_s = lease_every_s
        self._leaser: asyncio.Task | None = None
        self.flush_s = flush_s
        self.reconnect, self.retry_s = reconnect, retry_s
        self.retries = 0  # calls repeated because the router was down or rebuilding
        self._events: list[tuple[str, str, Any]] = []
        self._flusher: asyncio.Task | None = None
        self.use_channel, self.channel_retry_s, self.channel_timeout_s = channel, channel_retry_s, channel_timeout_s
        self._chan: chan.Channel | None = None
        self._chan_opening: asyncio.Task | None = None  # held: the loop keeps only weak references
        self._chan_next_try = 0.0
        self._chan_backoff = channel_retry_s  # doubles while opening fails (up to 60 s)
        self.channel_calls = 0  # answered over the direct channel
        self.channel_lost = 0  # calls that met a lost channel and went over Ray instead
        self.route_rtt_us: deque[float] = deque(maxlen=4096)  # route() as this caller waits for it

    def _channel(self) -> "chan.Channel | None":
        """The open channel, or None (then one is being opened in the background, or will be)."""
        ch = self._chan
        if ch is not None and not ch.closed:
            return ch
        self._chan = None
        if self.use_channel and (self._chan_opening is None or self._chan_opening.done()):
            loop = asyncio.get_running_loop()
            if loop.time() >= self._chan_next_try:
                self._chan_next_try = loop.time() + self._chan_backoff
                self._chan_opening = loop.create_task(self._open_channel())
        return None

    async def _open_channel(self) -> None:
        try:
            host, port, token = await self.handle.channel.remote()
            self._chan = await chan.Channel.open(host, port, token)
            self._chan_backoff = self.channel_retry_s
        except Exception:  # noqa: BLE001 - unreachable, restarting, or no channel: Ray serves meanwhile
            self._chan_backoff = min(2 * self._chan_backoff, 60.0)  # e.g. a firewall: stop trying so often

    def _post(self, event: tuple[str, str, Any]) -> None:
        self._events.append(event)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_s)
        self.flush()

    def flush(self) -> None:
        if self._events:
            batch, self._events = self._events, []
            self._send("events", batch)

    def _send(self, method: str, *args: Any) -> None:
        ch = self._channel()
        if ch is not None:
            try:
                return ch.send(method, *args)
            except chan.ChannelClosed:  # gone under us (the router restarting): Ray carries it
                self.channel_lost += 1
        getattr(self.handle, method).remote(*args)

    async def _ask(self, method: str, *args: Any, retry_s: float | None = None) -> Any:
        """One actor call, repeated while the router is down, restarting or rebuilding."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.retry_s if retry_s is None else retry_s)
        delay = 0.02
        ch = self._channel() if method in chan.ALLOWED else None
        if ch is not None:
            # Lifecycle events still buffered go first, on the same connection, so the
            # router decides knowing every request this ingress saw finish (a client's
            # next call often follows its last answer by less than `flush_s`).
            self.flush()
            try:
                res = await ch.call(method, *args, timeout_s=self.channel_timeout_s)
                self.channel_calls += 1
                if not isinstance(res, RouterUnavailable):
                    return res
            except (chan.ChannelClosed, asyncio.TimeoutError):
                # the router restarted, most likely (or its node is gone and no FIN came): Ray knows
                ch.close()
                self.channel_lost += 1
        while True:
            try:
                # bounded: a router that does not answer (stalled, or its node gone silent) must
                # not hold the request past the deadline (a decision it makes later is released
                # with its lease, as no ingress says it is live)
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    res = await getattr(self.handle, method).remote(*args)
                if not isinstance(res, RouterUnavailable):
                    return res
                why = res.message
            except TimeoutError:
                why = f"no answer in {self.retry_s if retry_s is None else retry_s:.0f} s"
            except RayActorError as e:
                why = f"{type(e).__name__}"
                try:  # gone for good: the named actor is found again, or created afresh
                    self.handle = await find_again(e, self.reconnect) or self.handle
                except Exception as e2:  # e.g. the name still held while Ray cleans up
                    why += f"; reconnect: {type(e2).__name__}"
            if loop.time() + delay > deadline:
                raise RouterUnavailable(f"The router is unavailable ({why}); please retry.")
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)

    async def route(self, req: RouteRequest) -> Decision:
        t = time.perf_counter()
        res = await self._ask("route", req)
        self.route_rtt_us.append((time.perf_counter() - t) * 1e6)
        if isinstance(res, ProximaError):
            raise res
        self.live.add(req.request_id)
        if self._leaser is None or self._leaser.done():
            self._leaser = asyncio.get_running_loop().create_task(self._renew_leases())
        return res

    async def _renew_leases(self) -> None:
        """Every lease_every_s, tell the router which of its bookings are still live here (their
        lease); stops when none is (and starts again with the next route)."""
        while self.live:
            await asyncio.sleep(self.lease_every_s)
            if self.live:
                self._post(("alive", "", sorted(self.live)))

    def first_token(self, request_id: str, engine_ttft_ms: float | None) -> None:
        self._post(("first", request_id, engine_ttft_ms))

    def finished(self, request_id: str, ok: bool) -> None:
        self.live.discard(request_id)
        self._post(("done", request_id, ok))

    async def predict(self, req: RouteRequest) -> float:
        res = await self._ask("predict", req)
        if isinstance(res, ProximaError):
            raise res
        return res

    def set_circuit(self, replica_id: str, open_: bool) -> None:
        self._send("set_circuit", replica_id, open_)

    async def stats(self) -> dict[str, Any]:
        self.flush()  # same caller, same actor: the batch lands before the stats call
        out = await self._ask("stats", retry_s=2.0)
        out["router_retries"] = self.retries
        out["router_channel"] = {"open": self._chan is not None and not self._chan.closed,
                                 "calls": self.channel_calls, "lost": self.channel_lost}
        rtt = sorted(self.route_rtt_us)
        if rtt:
            out["route_rtt_us_p50"] = round(rtt[len(rtt) // 2], 1)
        return out
