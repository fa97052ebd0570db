"""Dispatch and accounting for one request: a Stream of engine chunks.

`open()` runs routing and dispatch until the first chunk arrives, so every
failure before the first token (no replica, context too long on the engine,
all retries failed) still becomes a proper HTTP error, and the response
headers can name the replica that is really answering. Iterating yields the
chunks; `aclose()` (called on completion, error or client disconnect) closes
the engine stream, which aborts the engine's work, and does the accounting
exactly once: router.finished (via the failover loop's `done`), admission
settle with the tokens really used, metrics.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncIterator

from serving.engines.base import Chunk, GenerateRequest
from serving.errors import EngineError, Timeout
from serving.failover import stream_with_failover
from serving.failover.dispatch import Trace
from serving.types import Decision, RouteRequest

if TYPE_CHECKING:
    from serving.ingress.pipeline import Gateway, Job


class Stream:
    def __init__(self, gw: "Gateway", job: "Job", ticket: Any):
        self.gw, self.job, self.ticket = gw, job, ticket
        self.decision: Decision | None = None  # the decision whose replica produced the chunks
        self._routed: Decision | None = None
        self.first: Chunk | None = None
        self.prompt_tokens = job.prompt_tokens
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.ttft_s: float | None = None
        self.routed_ttft_s: float | None = None  # from the answering replica's routing decision
        self.engine_ttft_s: float | None = None  # from opening the engine stream
        self.error: BaseException | None = None
        self.trace = Trace()  # the failover loop's attempts
        self.reader = job.reader()  # the answer's reasoning and tool calls (None: all content)
        self.t0 = time.perf_counter()
        self._routed_at = self.t0
        self._closed = False
        self._it = stream_with_failover(job.route_request(), job.generate_request(), self._route,
                                        self._open, self._done, gw.retry, self.trace)

    # --- the failover loop's callbacks --------------------------------------
    async def _route(self, req: RouteRequest) -> Decision:
        if self.gw.failover is not None:
            self.gw.failover.tick()
        t = time.perf_counter()
        d = await self.gw.router.route(req)
        self._routed_at = time.perf_counter()
        self.gw.metrics.routing.observe(self._routed_at - t)
        self._routed = d
        return d

    async def _open(self, decision: Decision, gen: GenerateRequest) -> AsyncIterator[Chunk]:
        gw = self.gw
        delay = gw.rtt_s(self.job.client_region, decision.region) / 2
        if delay:
            await asyncio.sleep(delay)  # request leg
        t = time.perf_counter()
        first = True
        async with aclosing(gw.engines.open(decision, gen)) as it:
            async for chunk in it:
                if first:
                    first = False
                    self.engine_ttft_s = time.perf_counter() - t
                    engine_ms = self.engine_ttft_s * 1000.0
                    if delay:
                        await asyncio.sleep(delay)  # response leg
                    gw.router.first_token(decision.request_id, engine_ms)
                yield chunk

    def _done(self, decision: Decision, ok: bool, err: BaseException | None) -> None:
        self.gw.router.finished(decision.request_id, ok)
        if self.gw.failover is not None and (ok or isinstance(err, (EngineError, Timeout))):
            self.gw.failover.record(decision, ok)  # a client's disconnect is not the replica's fault

    # --- the caller's side -----------------------------------------------------
    async def open(self) -> Chunk:
        try:
            first = await anext(self._it)
        except StopAsyncIteration:  # the engine ended without a chunk: nothing was produced
            first = Chunk(self.job.request_id, (), "", "length", self.job.prompt_tokens)
        except BaseException as e:
            self.error = e
            await self.aclose(ok=False)
            raise
        self._take(first)
        self.first = first
        now = time.perf_counter()
        self.ttft_s, self.routed_ttft_s = now - self.t0, now - self._routed_at
        self.decision = self._routed
        self.gw.observer.opened(self)
        return first

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The first chunk again, then the rest; closes (and accounts) when done or abandoned."""
        assert self.first is not None, "open() first"
        ok = False
        try:
            yield self.first
            if self.first.finish_reason is None:
                async for c in self._it:
                    self._take(c)
                    yield c
            ok = True
        except BaseException as e:
            self.error = e
            raise
        finally:
            await self.aclose(ok)

    async def aclose(self, ok: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._it.aclose()
        finally:
            # Shielded: on a client disconnect this task is being cancelled, and the
            # settlement must happen anyway (it goes on in its own task).
            used = self.prompt_tokens + self.completion_tokens
            settle = asyncio.ensure_future(self.gw.admission.settle(self.job, self.ticket, used))
            self.gw.observer.done(self, ok)
            await asyncio.shield(settle)

    def _take(self, c: Chunk) -> None:
        if c.prompt_tokens:
            self.prompt_tokens = c.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, c.cached_tokens)
        self.completion_tokens = max(self.completion_tokens, c.completion_tokens)
        if c.finish_reason is not None:
            self.finish_reason = c.finish_reason

    @property
    def answer_finish_reason(self) -> str | None:
        """The finish_reason the client gets: "tool_calls" where the reader found calls."""
        return self.finish_reason if self.reader is None else self.reader.finish_reason(self.finish_reason)

    def headers(self) -> dict[str, str]:
        h = {"x-request-id": self.job.request_id, **dict(self.job.reply_headers)}
        d = self.decision
        if d is not None:
            h["x-proxima-region"] = d.region
            h["x-proxima-replica"] = d.replica_id
            h["x-proxima-predicted-ttft-ms"] = f"{d.predicted_ttft_ms:.1f}"
        return h
