"""Dispatch and accounting for one request: a Stream of engine chunks.

`open()` runs routing and dispatch until the first chunk arrives, so every
failure before the first token (no replica, context too long on the engine,
all retries failed) still becomes a proper HTTP error, and the response
headers can name the replica that is really answering. Iterating yields the
chunks; `aclose()` (called on completion, error or client disconnect) closes
the engine stream, which aborts the engine's work, and does the accounting
exactly once: router.finished (via the failover loop's `done`), admission
settle with the tokens really used, metrics.

A request for `n` choices is `n` Streams (`Choices`), each its own engine
request over the one prompt, with its own id (`<id>-<i>`), failover and
reader, as vLLM's server makes them (choice i samples with seed + i). The
first choice is opened first, so the prompt's blocks are on its replica when
the others are routed (the router sends them there unless it is loaded);
then the others, one after another (each waits for the one before it to
have its first chunk: a cached prompt's, a few ms). The response starts when every choice has
its first chunk: a choice that cannot be opened is the request's error, and
the choices already open are closed. Admission settles once, when every
choice has closed: the prompt once, and every choice's completion tokens.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any, AsyncIterator

from serving.engines.base import Chunk, GenerateRequest
from serving.errors import EngineError, Timeout, cancelled
from serving.failover import stream_with_failover
from serving.failover.dispatch import Trace
from serving.types import Decision, RouteRequest

if TYPE_CHECKING:
    from serving.ingress.pipeline import Gateway, Job


class Stream:
    def __init__(self, gw: "Gateway", job: "Job", ticket: Any, group: "Choices | None" = None):
        self.gw, self.job, self.ticket = gw, job, ticket
        self.group = group  # the request's choices, which settle together (None: settles alone)
        self.decision: Decision | None = None  # the decision whose replica produced the chunks
        self._routed: Decision | None = None
        self.first: Chunk | None = None
        self.prompt_tokens = job.prompt_tokens
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None  # vLLM's: the stop string or token id that ended it
        self.ttft_s: float | None = None
        self.routed_ttft_s: float | None = None  # from the answering replica's routing decision
        self.engine_ttft_s: float | None = None  # from opening the engine stream
        self.error: BaseException | None = None
        self.client_left = False  # it closed because the client went away (the observer says)
        self.trace = Trace()  # the failover loop's attempts
        self.reader = job.reader()  # the answer's reasoning and tool calls (None: all content)
        self.t0 = job.arrived or time.perf_counter()
        self._routed_at = time.perf_counter()
        self._closed = False
        self._dispatching = False  # holds the request's dispatch lock (Choices.dispatching)
        self._it = stream_with_failover(job.route_request(), job.generate_request(), self._route,
                                        self._open, self._done, gw.retry, self.trace)

    # --- the failover loop's callbacks --------------------------------------
    async def _route(self, req: RouteRequest) -> Decision:
        # A request's choices reach their engines one at a time, each from its routing to its
        # first chunk (see Choices.open; failover re-opens several at once too). Taken here,
        # outside the failover loop's first-token timer: waiting for a sibling is no replica's
        # stall. Released at the first chunk (_open) or when the attempt ends (_done).
        lock = self.group.dispatching if self.group is not None else None
        if lock is not None and not self._dispatching:
            await lock.acquire()
            self._dispatching = True
        try:
            if self.gw.failover is not None:
                self.gw.failover.tick()
            t = time.perf_counter()
            d = await self.gw.router.route(req)
        except BaseException:
            self._dispatched()
            raise
        self._routed_at = time.perf_counter()
        self.gw.metrics.routing.observe(self._routed_at - t)
        self._routed = d
        return d

    def _dispatched(self) -> None:
        """This choice's engine call is no longer pending: the next choice's may start."""
        if self._dispatching:
            self._dispatching = False
            assert self.group is not None
            self.group.dispatching.release()

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
                    self._dispatched()
                    self.engine_ttft_s = time.perf_counter() - t
                    engine_ms = self.engine_ttft_s * 1000.0
                    if delay:
                        await asyncio.sleep(delay)  # response leg
                    gw.router.first_token(decision.request_id, engine_ms)
                    if self.first is not None:  # a failover's: this replica answers now
                        self.decision = decision
                yield chunk

    def _done(self, decision: Decision, ok: bool, err: BaseException | None) -> None:
        self._dispatched()  # an attempt that never reached its first chunk (or never started)
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
            if self.group is not None and not self.job.parsed.stream and not cancelled(e):
                self.group.failed = True  # a whole answer failed: the request is the client's error
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
            settle = asyncio.ensure_future(self._settle())
            self.gw.observer.done(self, ok)
            await asyncio.shield(settle)

    async def discard(self) -> None:
        """A choice never opened (an earlier one failed to): no engine work to account, only
        its share of the settlement."""
        if self._closed:
            return
        self._closed = True
        await self._it.aclose()
        await self._settle()

    async def _settle(self) -> None:
        if self.group is None:
            await self.gw.admission.settle(self.job, self.ticket, self.billed)
        else:
            await self.group.settle(self)

    @property
    def billed(self) -> int:
        """Tokens this stream adds to the request's bill: what reached the client. A choice after
        the first adds its completion only (the prompt is billed once). Nothing when the client
        got an error instead of the answer: no engine answered (every attempt failed before its
        first token), a whole (non-streamed) answer failed, or another choice failed the request.
        A streamed answer cut by an error, or one the client left, is billed what was generated."""
        if self.first is None or (self.group is not None and self.group.failed):
            return 0
        if not self.job.parsed.stream and self.error is not None and not cancelled(self.error):
            return 0
        return self.completion_tokens + (self.prompt_tokens if self.job.choice == 0 else 0)

    @property
    def charged(self) -> int:
        """Tokens this stream adds to its tenant's budget (`billed`, where a budget is kept)."""
        return 0 if self.ticket is None else self.billed

    def _take(self, c: Chunk) -> None:
        if c.prompt_tokens:
            self.prompt_tokens = c.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, c.cached_tokens)
        self.completion_tokens = max(self.completion_tokens, c.completion_tokens)
        if c.finish_reason is not None:
            self.finish_reason = c.finish_reason
            self.stop_reason = c.stop_reason

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


class Choices:
    """A request's answers: one Stream per choice (`n`), opened and settled together."""

    def __init__(self, gw: "Gateway", job: "Job", ticket: Any):
        self.gw, self.job, self.ticket = gw, job, ticket
        n = job.parsed.n
        if n == 1:
            self.streams = [Stream(gw, job, ticket)]
        else:
            self.streams = [Stream(gw, replace(job, request_id=f"{job.request_id}-{i}", choice=i), ticket, self)
                            for i in range(n)]
        self._settled: list[Stream] = []
        self.dispatching = asyncio.Lock()  # held by a choice from its engine call to its first chunk
        self.failed = False  # the client gets an error, not the choices: nothing is billed
        self.closed: list[tuple[Stream, float, str | None]] = []  # (choice, e2e, error): the observer's

    async def open(self) -> None:
        """Every choice up to its first chunk, in order. If one cannot be opened, the others are
        closed and its error is raised."""
        first, rest = self.streams[0], self.streams[1:]
        try:
            await first.open()
        except BaseException:
            self.failed = True
            for s in rest:
                await s.discard()
            raise
        if not rest:
            return
        # One after another: Serve (2.60) gives every handle call made while serving one HTTP
        # request that request's internal id, and its request router indexes pending calls by
        # it; two calls pending together collide, and one is never assigned a replica (n of
        # 3-4 hung under `make run` until the stall timeout; in-process they never did). The
        # same holds when a replica dies under several choices and failover re-opens them:
        # `dispatching` lets one engine call be pending at a time.
        try:
            for s in rest:
                await s.open()
        except BaseException:
            self.failed = True
            for s in self.streams:  # the one that failed closed itself; those not reached are settled
                await (s.aclose(ok=False) if s.first is not None else s.discard())
            raise

    async def settle(self, stream: Stream) -> None:
        """One choice has closed; the last one settles the request: the prompt once, every
        choice's completion."""
        self._settled.append(stream)
        if len(self._settled) == len(self.streams):
            self.gw.observer.choices_done(self)
            await self.gw.admission.settle(self.job, self.ticket, sum(s.billed for s in self.streams))

    async def aclose(self) -> None:
        """Close every choice not closed yet (their engines abort; each is accounted once)."""
        for s in self.streams:
            await s.aclose()

    @property
    def stream(self) -> Stream:
        """The first choice: it names the replica in the response headers."""
        return self.streams[0]

    @property
    def prompt_tokens(self) -> int:
        return self.streams[0].prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    @property
    def cached_tokens(self) -> int:
        """The first choice's: the prompt as it was found in the cache (the others find it there)."""
        return self.streams[0].cached_tokens

    def headers(self) -> dict[str, str]:
        return self.streams[0].headers()
