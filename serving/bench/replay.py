"""Replay a trace against real engines and measure what the client sees.

Two ways in, same open-loop arrivals (record i is sent at timestamp_i / speed,
whatever happened to earlier ones):

- `replay_router`: Proxima's own `Router` (any policy) in front of
  `vllm_http` engines, with the lifecycle hooks the gateway calls (routed,
  first token with the observed TTFT, finished) and snapshots pushed from the
  engines' /metrics polls.
- `replay_http`: any OpenAI-compatible endpoint (a vllm-router in front of the
  same engines); the session id goes in `x-session-id` so session-affinity
  policies can pin it.

TTFT and end-to-end latency are measured at the client, per request;
`summarize` turns them and vLLM's own prefix-cache counter deltas into the
simulator's per-policy result format.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from serving.bench.trace import PromptMaker, TraceRecord
from serving.engines.base import GenerateRequest
from serving.engines.vllm_http import VLLMHttpEngine
from serving.errors import ProximaError
from serving.prefix.hashing import block_hashes
from serving.routing import Router
from serving.types import RouteRequest


@dataclass(frozen=True, slots=True)
class Outcome:
    index: int
    ok: bool
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    replica: str = ""
    error: str = ""
    sent_at: float = 0.0
    done_at: float = 0.0


async def _stream(engine: VLLMHttpEngine, greq: GenerateRequest, headers: dict[str, str] | None,
                  on_first=None) -> tuple[float, float, int, int, int]:
    t0 = time.perf_counter()
    first = None
    out = cached = prompt = 0
    async for ch in engine.generate(greq, headers=headers):
        if first is None and (ch.token_ids or ch.text):
            first = time.perf_counter()
            if on_first is not None:
                on_first((first - t0) * 1000.0)
        out, cached, prompt = ch.completion_tokens, max(cached, ch.cached_tokens), ch.prompt_tokens
    end = time.perf_counter()
    return ((first or end) - t0) * 1000.0, (end - t0) * 1000.0, out, cached, prompt


async def _paced(records: Sequence[TraceRecord], speed: float, one) -> list[Outcome]:
    start = time.perf_counter()
    t0 = records[0].timestamp_ms if records else 0.0

    async def at(rec: TraceRecord) -> Outcome:
        delay = start + (rec.timestamp_ms - t0) / 1000.0 / speed - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return await one(rec)

    return list(await asyncio.gather(*(at(r) for r in records)))


async def replay_router(records: Sequence[TraceRecord], prompts: PromptMaker,
                        engines: Sequence[VLLMHttpEngine], policy: str, *, speed: float = 1.0,
                        model: str = "tiny", block_size: int = 128, profile: str = "tiny-cpu",
                        push_interval_s: float = 0.1, tag: str = "",
                        router: Router | None = None, observe_ttft: bool = True) -> list[Outcome]:
    if router is None:
        router = Router(policy, block_size=block_size, default_profile=profile, seed=0)
    by_id = {e.replica_id: e for e in engines}
    for e in engines:
        router.update(e.snapshot())

    async def push() -> None:  # the engines' report loop
        while True:
            await asyncio.sleep(push_interval_s)
            for e in engines:
                router.update(e.snapshot())

    async def one(rec: TraceRecord) -> Outcome:
        ids = prompts.token_ids(rec)
        salt = rec.tenant or None
        rid = f"{tag}{policy}-{rec.index}"
        req = RouteRequest(rid, model, len(ids), block_hashes(ids, block_size, model, salt),
                           max_tokens=rec.output_length, tenant=rec.tenant, session_id=rec.session_id)
        sent = time.perf_counter()
        try:
            decision = router.route(req)
        except ProximaError as e:
            return Outcome(rec.index, False, error=f"{type(e).__name__}: {e}", sent_at=sent)
        greq = GenerateRequest(rid, tuple(ids), max_tokens=rec.output_length, model=model,
                               cache_salt=salt, temperature=0.0, ignore_eos=True)
        try:
            ttft, e2e, out, cached, prompt = await _stream(
                by_id[decision.replica_id], greq, None,
                lambda ms: router.on_first_token(rid, engine_ttft_ms=ms if observe_ttft else None))
        except ProximaError as e:
            router.on_finished(rid, ok=False)
            return Outcome(rec.index, False, replica=decision.replica_id,
                           error=f"{type(e).__name__}: {e}", sent_at=sent, done_at=time.perf_counter())
        router.on_finished(rid, ok=True)
        return Outcome(rec.index, True, ttft, e2e, prompt, cached, out, decision.replica_id,
                       sent_at=sent, done_at=time.perf_counter())

    pusher = asyncio.get_running_loop().create_task(push())
    try:
        return await _paced(records, speed, one)
    finally:
        pusher.cancel()


async def replay_http(records: Sequence[TraceRecord], prompts: PromptMaker, url: str, *,
                      speed: float = 1.0, model: str = "tiny", name: str = "peer",
                      text_prompts: bool = True) -> list[Outcome]:
    """Through an OpenAI-compatible router. Text prompts, so text-based cache-aware
    routing sees real text (each word is one token: the engine sees the same ids)."""
    client = VLLMHttpEngine(name, url, model=model, served_model=model)

    async def one(rec: TraceRecord) -> Outcome:
        ids = prompts.token_ids(rec)
        salt = rec.tenant or None
        rid = f"{name}-{rec.index}"
        greq = (GenerateRequest(rid, prompt=prompts.text(ids), max_tokens=rec.output_length, model=model,
                                cache_salt=salt, temperature=0.0, ignore_eos=True) if text_prompts else
                GenerateRequest(rid, tuple(ids), max_tokens=rec.output_length, model=model,
                                cache_salt=salt, temperature=0.0, ignore_eos=True))
        headers = {"x-session-id": rec.session_id} if rec.session_id else None
        sent = time.perf_counter()
        try:
            ttft, e2e, out, cached, prompt = await _stream(client, greq, headers)
        except ProximaError as e:
            return Outcome(rec.index, False, error=f"{type(e).__name__}: {e}", sent_at=sent,
                           done_at=time.perf_counter())
        return Outcome(rec.index, True, ttft, e2e, prompt, cached, out, sent_at=sent,
                       done_at=time.perf_counter())

    try:
        return await _paced(records, speed, one)
    finally:
        await client.close()


def summarize(outcomes: Sequence[Outcome], hits: int, queries: int) -> dict:
    ok = [o for o in outcomes if o.ok]
    ttft = np.array([o.ttft_ms for o in ok]) if ok else np.zeros(1)
    e2e = np.array([o.e2e_ms for o in ok]) if ok else np.zeros(1)
    wall = (max(o.done_at for o in ok) - min(o.sent_at for o in outcomes)) if ok else 0.0
    out_tokens = sum(o.output_tokens for o in ok)
    per_replica: dict[str, int] = {}
    for o in ok:
        per_replica[o.replica] = per_replica.get(o.replica, 0) + 1
    return {
        "cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1),
        "ttft_p90_ms": round(float(np.percentile(ttft, 90)), 1),
        "ttft_p99_ms": round(float(np.percentile(ttft, 99)), 1),
        "e2e_p50_ms": round(float(np.percentile(e2e, 50)), 1),
        "e2e_p99_ms": round(float(np.percentile(e2e, 99)), 1),
        "throughput_tok_s": round(out_tokens / wall, 1) if wall > 0 else 0.0,
        "requests": len(outcomes),
        "finished": len(ok),
        "failed": len(outcomes) - len(ok),
        "client_cached_tokens": sum(o.cached_tokens for o in ok),
        "prompt_tokens": sum(o.prompt_tokens for o in ok),
        "vllm_prefix_cache_hits": hits,
        "vllm_prefix_cache_queries": queries,
        "per_replica": dict(sorted(per_replica.items())) if any(per_replica) else {},
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
    }
