"""Engine deployment: one Serve replica hosts one engine from the factory.

Its name for the router is "<region>-<Serve replica unique id>", which the
DecisionRouter matches to send each call where the central router decided.
Every `router.snapshot_period_s` it pushes the engine's snapshot and its call
counters (started, finished, aborted, failed, misrouted) to the router actor.

The stream carries lists of chunks (what piled up since the last send).
Errors travel as values inside the stream (a ProximaError item), so the
ingress raises the project's own error rather than a Ray wrapper. Closing the
stream (the ingress cancels the call when its client went away) closes the
engine's generator, which aborts the engine's work.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from serving.config import load_config
from serving.engines.base import GenerateRequest
from serving.engines.factory import EngineSpec, make_engine
from serving.errors import EngineError, ProximaError
from serving.observability.logs import configure_logging, request_context
from serving.ray.router_actor import router_actor

log = logging.getLogger("proxima.engine")
_END = object()


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
class EngineDeployment:
    async def __init__(self, config: dict[str, Any], region: str, model: str):
        cfg = load_config(config)
        configure_logging(cfg.observability.log_format)
        r = cfg.regions[region]
        uid = serve.get_replica_context().replica_id.unique_id
        self.replica_id = f"{region}-{uid}"
        self.engine = make_engine(EngineSpec(r.engine.kind, self.replica_id, region, model, r.profile,
                                             r.kv_capacity_tokens, dict(r.engine.options)))
        start = getattr(self.engine, "start", None)
        if start is not None:
            await start()
        self.counters = {"started": 0, "finished": 0, "aborted": 0, "failed": 0, "misrouted": 0}
        self.router = router_actor(config)
        self.config = config
        self.period_s = cfg.router.snapshot_period_s
        self.interval_s = cfg.serve.stream_interval_ms / 1000.0
        await self._push()  # known to the router before the first request can arrive
        self._task = asyncio.get_running_loop().create_task(self._report())

    async def generate(self, gen: GenerateRequest, target: str = "") -> AsyncIterator[Any]:
        """Yields lists of chunks: the first alone and at once, later ones coalesced.

        Each yield is one object crossing processes (about as much CPU as a
        small actor call). After the first, a batch leaves at most every
        `serve.stream_interval_ms` with whatever the engine produced meanwhile:
        an engine slower than that (a decode step is 10-50 ms) sends every
        token as it comes, a burst (a fast engine, a lagging consumer) goes out
        in a few objects instead of one per token, and the TTFT is untouched.
        """
        if target and target != self.replica_id:
            self.counters["misrouted"] += 1
            yield EngineError(f"call for {target} reached {self.replica_id}")
            return
        self.counters["started"] += 1
        request_context(id=gen.request_id)  # the pump task below inherits it: its log lines carry the id
        queue: asyncio.Queue = asyncio.Queue()
        pump = asyncio.get_running_loop().create_task(self._pump(gen, queue))
        outcome = "aborted"
        loop, sent = asyncio.get_running_loop(), None
        try:
            while True:
                batch = [await queue.get()]
                if sent is not None and batch[0] is not _END and not isinstance(batch[0], ProximaError):
                    wait = sent + self.interval_s - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)  # let the tokens of the next few ms join
                while not queue.empty():
                    batch.append(queue.get_nowait())
                end = batch[-1]
                if end is _END:
                    batch.pop()
                    if batch:
                        yield batch
                    outcome = "finished"
                    return
                if isinstance(end, ProximaError):
                    if len(batch) > 1:
                        yield batch[:-1]
                    outcome = "failed"
                    yield end
                    return
                sent = loop.time()
                yield batch
        finally:
            pump.cancel()  # the caller went away: cancelling the pump closes the engine's stream
            self.counters[outcome] += 1

    async def _pump(self, gen: GenerateRequest, queue: asyncio.Queue) -> None:
        try:
            async for chunk in self.engine.generate(gen):
                queue.put_nowait(chunk)
            queue.put_nowait(_END)
        except ProximaError as e:
            queue.put_nowait(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # translate at the boundary; details stay in this log
            log.exception("engine %s failed", self.replica_id)
            queue.put_nowait(EngineError(f"replica {self.replica_id} failed: {type(e).__name__}"))

    async def snapshot(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "counters": dict(self.counters)}

    async def _push(self) -> None:
        await self.router.update.remote(self.engine.snapshot(), dict(self.counters))

    async def _report(self) -> None:
        while True:
            try:
                await self._push()
            except ActorUnavailableError:  # restarting: report next period
                log.warning("router restarting; %s reports next period", self.replica_id)
            except RayActorError:  # dead, or gone for good: find the named actor again (or create it)
                log.warning("router gone; %s reconnects", self.replica_id)
                try:
                    self.router = await asyncio.to_thread(router_actor, self.config)
                except Exception as e:
                    log.warning("reconnect from %s failed: %s", self.replica_id, type(e).__name__)
            except Exception as e:  # the router restarting: keep serving, report next time
                log.warning("snapshot push from %s failed: %s", self.replica_id, type(e).__name__)
            await asyncio.sleep(self.period_s)

    async def __del__(self) -> None:
        self._task.cancel()
        try:
            self.router.remove.remote(self.replica_id)
        except Exception:
            pass
