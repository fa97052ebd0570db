"""Real vLLM behind the router: streaming, prefix-cache affinity, a replica killed mid-run.

Servers come from the session fixture (tests/e2e/conftest.py): 0 and 1 serve
the streaming and prefix tests, 2 is the one the failover test kills.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from serving.engines.base import GenerateRequest
from serving.engines.vllm_http import VLLMHttpEngine
from serving.errors import EngineError
from serving.prefix.hashing import block_hashes
from serving.routing import Router
from serving.types import Health, RouteRequest

pytestmark = pytest.mark.e2e
BLOCK = 128


def _words(model_dir: str) -> list[int]:
    return json.loads((Path(model_dir) / "proxima_words.json").read_text())["ids"]


async def _engines(servers, idx: list[int]) -> list[VLLMHttpEngine]:
    engines = [VLLMHttpEngine(f"e{i}", servers.urls[i], model="tiny") for i in idx]
    for e in engines:
        await e.start()
        await e.reset_prefix_cache()
        assert e.snapshot().health is Health.UP
    return engines


async def _drain(engine: VLLMHttpEngine, req: GenerateRequest):
    return [c async for c in engine.generate(req)]


async def test_streamed_completion_from_real_vllm(vllm_servers, tiny_model):
    ids = tuple(random.Random(1).choice(_words(tiny_model)) for _ in range(300))
    (e,) = await _engines(vllm_servers, [0])
    try:
        chunks = await _drain(e, GenerateRequest("stream-1", ids, max_tokens=12, temperature=0.0, ignore_eos=True))
        again = await _drain(e, GenerateRequest("stream-2", ids, max_tokens=12, temperature=0.0, ignore_eos=True))
    finally:
        await e.close()
    assert len(chunks) >= 2, "tokens must arrive as a stream, not one response"
    assert sum(len(c.token_ids) for c in chunks) == 12  # ignore_eos: exact length
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens, chunks[-1].prompt_tokens) == ("length", 12, 300)
    assert "".join(c.text for c in chunks).strip()
    assert chunks[-1].cached_tokens == 0
    assert again[-1].cached_tokens == 256  # two full 128-token blocks of the 300 reused
    assert [t for c in again for t in c.token_ids] == [t for c in chunks for t in c.token_ids]  # greedy


async def test_shared_prefix_burst_lands_on_the_replica_holding_it(vllm_servers, tiny_model):
    rng = random.Random(2)
    words = _words(tiny_model)
    prefix = [rng.choice(words) for _ in range(1024)]
    prompts = [prefix + [rng.choice(words) for _ in range(64)] for _ in range(7)]
    engines = await _engines(vllm_servers, [0, 1])
    by_id = {e.replica_id: e for e in engines}
    router = Router("latency", block_size=BLOCK, default_profile="tiny-cpu", seed=0)
    for e in engines:
        router.update(e.snapshot())

    async def send(i: int):
        req = RouteRequest(f"burst-{i}", "tiny", len(prompts[i]), block_hashes(prompts[i], BLOCK, "tiny"),
                           max_tokens=4)
        d = router.route(req)
        chunks = await _drain(by_id[d.replica_id], GenerateRequest(req.request_id, tuple(prompts[i]),
                                                                   max_tokens=4, temperature=0.0, ignore_eos=True))
        router.on_finished(req.request_id)
        return d, chunks[-1]

    try:
        first, _ = await send(0)
        before = {e.replica_id: (await e.poll(), e.snapshot().prefix_cache_hits)[1] for e in engines}
        results = await asyncio.gather(*(send(i) for i in range(1, 7)))
        after = {e.replica_id: (await e.poll(), e.snapshot().prefix_cache_hits)[1] for e in engines}
    finally:
        for e in engines:
            await e.close()
    holder = first.replica_id
    other = next(r for r in by_id if r != holder)
    assert [d.replica_id for d, _ in results] == [holder] * 6
    assert all(d.cached_tokens == 1024 for d, _ in results)  # the router predicted the hit ...
    assert [c.cached_tokens for _, c in results] == [1024] * 6  # ... and vLLM reports it per request
    assert after[holder] - before[holder] == 6 * 1024  # ... and in its own counters
    assert after[other] == before[other]


async def test_killed_engine_is_marked_down_and_traffic_moves_on(vllm_servers, tiny_model):
    rng = random.Random(3)
    words = _words(tiny_model)
    engines = await _engines(vllm_servers, [0, 2])
    survivor, victim = engines
    router = Router("latency", block_size=BLOCK, default_profile="tiny-cpu", seed=0)
    for e in engines:
        router.update(e.snapshot())
    ids = tuple(rng.choice(words) for _ in range(200))
    try:
        # A long stream on the victim; kill its server once tokens flow.
        d = router.route(RouteRequest("long", "tiny", len(ids), max_tokens=4000,
                                      exclude=frozenset({survivor.replica_id})))
        assert d.replica_id == victim.replica_id
        stream = victim.generate(GenerateRequest("long", ids, max_tokens=4000, temperature=0.0, ignore_eos=True))
        got = [await stream.__anext__()]
        vllm_servers.kill(2)
        with pytest.raises(EngineError):
            async for c in stream:
                got.append(c)
        router.on_finished("long", ok=False)
        assert got[0].token_ids
        assert victim.snapshot().health is Health.DOWN
        assert await victim.poll() is False  # the metrics poll agrees: unreachable
        router.update(victim.snapshot())
        placed = []
        for i in range(4):
            p = tuple(rng.choice(words) for _ in range(150))
            req = RouteRequest(f"after-{i}", "tiny", len(p), block_hashes(p, BLOCK, "tiny"), max_tokens=3)
            dec = router.route(req)
            chunks = await _drain(survivor, GenerateRequest(req.request_id, p, max_tokens=3, ignore_eos=True))
            router.on_finished(req.request_id)
            placed.append((dec.replica_id, chunks[-1].completion_tokens))
    finally:
        for e in engines:
            await e.close()
    assert placed == [(survivor.replica_id, 3)] * 4
