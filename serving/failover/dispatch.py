"""Dispatch with failover: retry before the first token, continue after it.

    attempt 1: route(req)                          -> stream from the chosen replica
    fails before any token: route again excluding every replica tried, first
        inside the failed replica's region (next-best replica), then across
        all allowed regions (another region); at most `max_attempts` in all
    fails after tokens were sent: route a *continuation*: prompt + tokens sent,
        max_tokens - sent, the original seed and token_offset = sent
        (see GenerateRequest), so the client's stream goes on where it stopped;
        except an answer constrained to a JSON format (response_format, a
        forced tool call): structured outputs would start the JSON over, so that
        stream ends with the replica's error instead

Every attempt routes with the request's own `allowed_regions`, only ever
narrowed, so no retry or continuation can leave the tenant's residency; when no
allowed replica is left the router's ResidencyUnavailable (503) propagates.
Chunks leave with the original request id, cumulative completion_tokens and
the original prompt size, so the caller can't tell a continuation happened
except from `attempts`.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Awaitable, Callable

from serving.engines.base import Chunk, GenerateRequest, default_seed
from serving.errors import EngineError, NoReplicaAvailable, ProximaError, ResidencyUnavailable, Timeout
from serving.types import Decision, RouteRequest

Route = Callable[[RouteRequest], Awaitable[Decision]]
Open = Callable[[Decision, GenerateRequest], AsyncIterator[Chunk]]
Done = Callable[[Decision, bool, BaseException | None], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 4
    first_token_timeout_s: float | None = 30.0  # a hung replica counts as failed
    stall_timeout_s: float | None = 30.0  # between chunks after the first


@dataclass(slots=True)
class Trace:
    """What happened, for headers, metrics and tests."""

    attempts: list[tuple[str, str, int, str]] = field(default_factory=list)  # replica, region, sent, outcome
    continued: int = 0

    @property
    def replicas(self) -> list[str]:
        return [a[0] for a in self.attempts]


def continuation(gen: GenerateRequest, sent_ids: list[int], sent_text: str, attempt: int,
                 seed: int) -> GenerateRequest:
    """The request that resumes `gen` after `sent_ids` were delivered."""
    n = len(sent_ids)
    rid = gen.request_id if attempt == 1 else f"{gen.request_id}~{attempt}"
    if n == 0:
        return replace(gen, request_id=rid, seed=seed)
    kw: dict = {}
    if gen.prompt_token_ids:
        kw["prompt_token_ids"] = tuple(gen.prompt_token_ids) + tuple(sent_ids)
        kw["block_hashes"] = None
    elif gen.prompt is not None:
        kw["prompt"] = gen.prompt + sent_text
        kw["block_hashes"] = None
    # else: a sizes-only request (trace replay): its hashes still prefix the longer prompt
    if gen.prompt_len is not None:
        kw["prompt_len"] = gen.prompt_len + n
    return replace(gen, request_id=rid, max_tokens=gen.max_tokens - n, seed=seed,
                   token_offset=gen.token_offset + n, **kw)


async def stream_with_failover(req: RouteRequest, gen: GenerateRequest, route: Route, open_: Open,
                               done: Done | None = None, policy: RetryPolicy = RetryPolicy(),
                               trace: Trace | None = None) -> AsyncIterator[Chunk]:
    trace = trace if trace is not None else Trace()
    seed = gen.seed if gen.seed is not None else default_seed(gen.request_id)
    tried: set[str] = set(req.exclude)
    sent_ids: list[int] = []
    sent_text: list[str] = []
    prompt_tokens = cached = 0
    answered = False  # a first chunk went out, and with it what describes the prompt (logprobs, ids)
    failed_region: str | None = None
    last_error: ProximaError | None = None
    for attempt in range(1, policy.max_attempts + 1):
        n = len(sent_ids)
        rreq = replace(req, request_id=gen.request_id if attempt == 1 else f"{gen.request_id}~{attempt}",
                       exclude=frozenset(tried), prompt_tokens=req.prompt_tokens + n,
                       max_tokens=max(1, req.max_tokens - n))
        decision = await _route(route, rreq, failed_region, last_error)
        g = continuation(gen, sent_ids, "".join(sent_text), attempt, seed)
        if answered:  # not again: a continuation's prompt is longer (it holds the tokens sent)
            g = replace(g, prompt_logprobs=None, return_prompt_ids=False)
        got = 0
        try:
            async with aclosing(open_(decision, g)) as it:
                while True:
                    limit = policy.first_token_timeout_s if got == 0 else policy.stall_timeout_s
                    try:
                        async with asyncio.timeout(limit):  # no task per chunk, as wait_for makes
                            chunk = await anext(it)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        raise Timeout(f"replica {decision.replica_id} stalled for {limit} s")
                    got += 1
                    if attempt == 1 or not prompt_tokens:
                        prompt_tokens, cached = chunk.prompt_tokens - n, chunk.cached_tokens
                    sent_ids.extend(chunk.token_ids)
                    sent_text.append(chunk.text)
                    if answered and (chunk.prompt_logprobs is not None or chunk.prompt_token_ids is not None):
                        chunk = replace(chunk, prompt_logprobs=None, prompt_token_ids=None)  # an engine's again
                    answered = True
                    yield replace(chunk, request_id=gen.request_id, prompt_tokens=prompt_tokens,
                                  cached_tokens=cached, completion_tokens=len(sent_ids))
        except (EngineError, Timeout) as e:  # the replica failed: try elsewhere
            trace.attempts.append((decision.replica_id, decision.region, len(sent_ids), "failed"))
            tried.add(decision.replica_id)
            failed_region = decision.region
            last_error = e
            if sent_ids:
                trace.continued += 1
            await _call(done, decision, False, e)
            if len(sent_ids) >= gen.max_tokens:  # it died after the last token, before "finished"
                yield Chunk(gen.request_id, (), "", "length", prompt_tokens, cached, len(sent_ids))
                return
            if sent_ids and gen.constrained:
                # Structured outputs constrain what an engine generates, from its first token:
                # a continuation would start the format over after the part already sent.
                raise EngineError(f"replica {decision.replica_id} failed after {len(sent_ids)} tokens of an "
                                  "answer held to a format (structured outputs), which another replica "
                                  f"cannot continue; retry the request ({e.message})")
            continue
        except BaseException as e:  # client went away, or a non-retriable error
            trace.attempts.append((decision.replica_id, decision.region, len(sent_ids), "aborted"))
            await _call(done, decision, False, e)
            raise
        trace.attempts.append((decision.replica_id, decision.region, len(sent_ids), "ok"))
        await _call(done, decision, True, None)
        return
    assert last_error is not None
    raise EngineError(f"request failed on {policy.max_attempts} replicas "
                      f"({', '.join(trace.replicas)}); last error: {last_error.message}")


async def _route(route: Route, rreq: RouteRequest, failed_region: str | None,
                 last_error: ProximaError | None) -> Decision:
    """Next-best replica in the failed one's region first, then any allowed region."""
    if failed_region is not None and (rreq.allowed_regions is None
                                      or failed_region in rreq.allowed_regions):
        try:
            return await route(replace(rreq, allowed_regions=frozenset({failed_region})))
        except NoReplicaAvailable:
            pass
    try:
        return await route(rreq)
    except NoReplicaAvailable as e:
        if last_error is None or type(e) is not NoReplicaAvailable:
            raise
        tried = ", ".join(sorted(rreq.exclude))
        if rreq.allowed_regions is not None:  # say it: residency is why it was not moved on
            raise ResidencyUnavailable(
                f"No replica of `{rreq.model}` is left in the allowed regions "
                f"{sorted(rreq.allowed_regions)}: {tried} failed (last: {last_error.message}); "
                "the request was not moved elsewhere.") from None
        e.message = f"{e.message} Tried {tried}; last replica error: {last_error.message}"
        e.args = (e.message,)
        raise


async def _call(done: Done | None, decision: Decision, ok: bool, err: BaseException | None) -> None:
    if done is not None:
        res = done(decision, ok, err)
        if asyncio.iscoroutine(res):
            await res
