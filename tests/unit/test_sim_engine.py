"""The simulated engine: SimCore (time-free scheduler + paged KV) and SimEngine (wall clock)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.engines.base import GenerateRequest
from serving.engines.kv import BlockPool
from serving.engines.profiles import EngineProfile, get_profile
from serving.engines.sim import SimEngine
from serving.engines.sim_core import Seq, SimCore
from serving.errors import ContextLengthExceeded, EngineError
from serving.prefix import block_hashes

P = EngineProfile("t", a_ms=5.0, b_ms_per_token=0.02, c_ms_per_seq=0.1,
                  max_num_batched_tokens=1024, max_num_seqs=8, block_size=16)


def seq(rid: str, tokens: list[int], max_tokens: int = 4) -> Seq:
    return Seq(rid, len(tokens), block_hashes(tokens, P.block_size, "m"), max_tokens)


def run_to_first_token(core: SimCore, s: Seq) -> float:
    """Virtual ms from now until `s` emits its first token."""
    core.add(s)
    t = 0.0
    while s.out == 0:
        t += core.step().duration_ms
    return t


def drain(core: SimCore) -> float:
    t = 0.0
    while not core.idle:
        t += core.step().duration_ms
    return t


PROMPT = list(range(3000))


@pytest.mark.parametrize("name, warm_tokens, expect_cached", [
    ("cold", 0, 0),
    ("whole prompt cached but the last token", 3000, 2992),  # 187 full blocks
    ("half cached", 1504, 1504),
])
def test_cached_prompt_prefills_faster(name, warm_tokens, expect_cached):
    core = SimCore(P, 100_000)
    if warm_tokens:
        run_to_first_token(core, seq("warm", PROMPT[:warm_tokens]))
        drain(core)
    ttft = run_to_first_token(core, seq("q", PROMPT))
    s_cached = expect_cached
    uncached = 3000 - s_cached
    steps = -(-uncached // P.max_num_batched_tokens)
    # Step formula: every step costs a + b*prefill (+ c*decoding, none here).
    assert ttft == pytest.approx(steps * P.a_ms + P.b_ms_per_token * uncached), name
    cold = 3 * P.a_ms + P.b_ms_per_token * 3000
    assert (ttft < cold) == bool(warm_tokens), name


def test_counters_match_what_was_served():
    core = SimCore(P, 100_000)
    for i, n in enumerate((800, 800, 1600)):  # second repeats the first; third extends it
        run_to_first_token(core, seq(f"q{i}", PROMPT[:n]))
    drain(core)
    assert core.queries == 800 + 800 + 1600  # tokens looked up, as vLLM counts them
    assert core.hits == 784 + 800  # 784: the last token is always recomputed
    assert core.pending_prefill == 0
    assert core.pool.num_used == 0  # everything freed, cached blocks evictable
    assert len(core.pool.evictable) == 1600 // 16


@pytest.mark.parametrize("name, queued, expect", [
    ("cold prompt: all of it", [(5000, 500)], 500),
    ("half cached: only the uncached half", [(0, 3000)], 3000 - 1504),
    ("wholly cached: the last block is recomputed", [(0, 1504)], 16),
    ("several waiting", [(0, 3000), (5000, 500), (0, 1504)], 1496 + 500 + 16),
])
def test_snapshot_queue_is_the_uncached_prefill_still_to_compute(name, queued, expect):
    from serving.sim.replica import Replica
    eng = SimEngine("e0", model="m", profile=P, kv_capacity_tokens=100_000)
    run_to_first_token(eng.core, seq("warm", PROMPT[:1504]))
    drain(eng.core)
    for k, (start, n) in enumerate(queued):  # queued, not yet admitted: no step runs
        eng.core.add(seq(f"q{k}", list(range(start, start + n))))
    assert eng.snapshot().waiting_prefill_tokens == expect, name
    rep = Replica("r0", "local", "m", P, 100_000)  # the simulator's replica reports the same
    rep.core = eng.core
    assert rep.snapshot(0.0).waiting_prefill_tokens == expect, name
    admitted = eng.core.step().prefill_tokens  # what the engine then really computes
    assert admitted == min(expect, P.max_num_batched_tokens), name


def test_prefill_in_flight_is_reported_until_its_step_ends():
    """A step's effects are applied when it starts; until its time has passed, the part of
    its prefill not yet run is still work ahead of a newcomer."""
    from serving.sim.replica import Replica
    core = SimCore(P, 100_000)
    core.add(seq("a", PROMPT[:1000]))
    res = core.step()
    assert res.prefill_tokens == 1000 and core.pending_prefill == 0 and core.uncached_pending == 0
    step = res.prefill_tokens
    assert (core.pending_at(step, 1.0), core.pending_at(step, 0.25), core.pending_at(step, -1)) == (1000, 250, 0)
    rep = Replica("r0", "local", "m", P, 100_000)  # the simulator's replica, in virtual time
    rep.core.add(seq("a", PROMPT[:1000]))
    end = rep.plan(0.0)  # 5 + 0.02 * 1000 = 25 ms
    assert rep.snapshot(end / 4).waiting_prefill_tokens == 750
    rep.finish()
    assert rep.snapshot(end).waiting_prefill_tokens == 0


def test_eviction_under_pressure_is_lru():
    core = SimCore(P, 64 * 16)  # 64 blocks
    a, b, c = (list(range(k * 10_000, k * 10_000 + 480)) for k in range(3))  # 30 blocks each
    for rid, toks in (("a", a), ("b", b)):
        run_to_first_token(core, seq(rid, toks))
        drain(core)
    assert core.pool.cached_prefix(block_hashes(a, 16, "m")) == 30
    run_to_first_token(core, seq("c", c))  # needs 30 blocks (+1 decode): evicts a's first
    drain(core)
    assert core.pool.evictions > 0
    # The least recently freed went first; a request frees its last block first (as
    # vLLM does), so `a` keeps only its head and `b`, more recent, keeps everything.
    assert 0 < core.pool.cached_prefix(block_hashes(a, 16, "m")) < 30
    assert core.pool.cached_prefix(block_hashes(b, 16, "m")) == 30  # more recent: kept
    hits_before = core.hits
    run_to_first_token(core, seq("b2", b))
    assert core.hits - hits_before == 30 * 16 - 16  # all but the recomputed last block


def test_decoding_sequences_preempt_the_newest_when_kv_runs_out():
    core = SimCore(P, 16 * 16)  # 16 blocks; each sequence grows to 10
    s1, s2 = seq("s1", list(range(60)), 100), seq("s2", list(range(100, 160)), 100)
    core.add(s1)
    core.add(s2)
    for _ in range(80):
        core.step()
    assert core.preemptions >= 1 and s2.preemptions >= 1 and s1.preemptions == 0
    drain(core)
    assert s1.out == 100 and s2.out == 100 and core.pool.num_used == 0


def test_prompt_larger_than_the_cache_is_refused():
    core = SimCore(P, 4 * 16)
    core.add(seq("big", list(range(200))))
    with pytest.raises(ValueError):
        core.step()


def test_block_pool_refcounts_and_reset():
    pool = BlockPool(4, 16)
    pool.allocate(2)
    pool.promote_many([1, 2])
    assert pool.num_used == 2 and pool.cached_prefix([1, 2, 3]) == 2
    pool.free([1, 2], 0)
    assert pool.num_used == 0 and list(pool.evictable) == [2, 1]  # last block evicts first
    pool.reset()
    assert pool.cached_prefix([1]) == 0 and pool.num_free == 4


# --- SimEngine on the wall clock ----------------------------------------------------

async def collect(engine: SimEngine, req: GenerateRequest):
    t0 = time.perf_counter()
    first = None
    chunks = []
    async for c in engine.generate(req):
        if first is None:
            first = time.perf_counter() - t0
        chunks.append(c)
    return first, chunks


async def test_sim_engine_streams_and_reports_vllm_counters():
    eng = SimEngine("e0", "us-east", "m", profile=get_profile("llama3-8b-h100"), kv_capacity_tokens=50_000)
    toks = tuple(range(2000))
    ttft_cold, chunks = await collect(eng, GenerateRequest("r1", toks, max_tokens=5, model="m"))
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
    assert chunks[0].prompt_tokens == 2000 and chunks[0].cached_tokens == 0
    ttft_warm, chunks = await collect(eng, GenerateRequest("r2", toks, max_tokens=5, model="m"))
    assert chunks[0].cached_tokens == 1984
    snap = eng.snapshot()
    assert snap.prefix_cache_queries == 4000 and snap.prefix_cache_hits == 1984
    assert snap.num_running == 0 and snap.num_waiting == 0 and snap.kv_capacity_tokens == 50_000
    # Cold: 5.75 + 0.01725 * 2000 = 40 ms of prefill; warm: about one step (5.8 ms).
    assert ttft_cold > 0.035 and ttft_warm < ttft_cold
    await eng.close()


async def test_sim_engine_reports_the_prefill_it_is_computing():
    slow = EngineProfile("slow", a_ms=5.0, b_ms_per_token=0.3, c_ms_per_seq=0.1,
                         max_num_batched_tokens=1024, max_num_seqs=8, block_size=16)
    eng = SimEngine("e0", model="m", profile=slow, kv_capacity_tokens=100_000)  # a 305 ms step
    gen = eng.generate(GenerateRequest("a", tuple(range(1000)), max_tokens=2, model="m"))
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.03)  # inside the prefill step
    left = eng.snapshot().waiting_prefill_tokens
    assert not first.done() and 0 < left < 1000
    await first
    assert eng.snapshot().waiting_prefill_tokens == 0
    await gen.aclose()
    await eng.close()


async def test_sim_engine_abort_and_kill():
    eng = SimEngine("e0", model="m", kv_capacity_tokens=50_000)
    gen = eng.generate(GenerateRequest("long", tuple(range(100)), max_tokens=10_000, model="m"))
    await gen.__anext__()
    await gen.aclose()  # the client went away: the engine drops the request
    await asyncio.sleep(0.02)
    assert eng.snapshot().num_running == 0
    gen = eng.generate(GenerateRequest("k", tuple(range(100)), max_tokens=10_000, model="m"))
    await gen.__anext__()
    eng.kill()
    with pytest.raises(EngineError):
        async for _ in gen:
            pass
    with pytest.raises(EngineError):
        await collect(eng, GenerateRequest("after", (1, 2, 3), model="m"))
    eng.revive()
    _, chunks = await collect(eng, GenerateRequest("again", (1, 2, 3), max_tokens=2, model="m"))
    assert chunks[-1].finish_reason == "length"
    await eng.close()


async def test_sim_engine_rejects_prompts_over_its_context():
    eng = SimEngine("e0", model="m", kv_capacity_tokens=1000)
    with pytest.raises(ContextLengthExceeded):
        await collect(eng, GenerateRequest("big", tuple(range(990)), max_tokens=20, model="m"))
    await eng.close()


@pytest.mark.parametrize("pieces,stops,want", [
    ([" a b", " c d", " e"], ("c",), ([" a b", " "], True)),  # ends before the stop string
    ([" ab", "c d"], ("bc",), (["", " a"], True)),  # across two tokens; " ab" was held whole
    ([" ab", "x y"], ("bc", "q"), (["", " abx y"], False)),  # held back, then released
    ([" a", " b", " c"], ("zz",), (["", " a", " b c"], False)),  # a token is held while its last character
                                                               # could begin "zz"; the last releases all
    ([" a"], ("",), ([" a"], False)),  # an empty stop string stops nothing
])
def test_stop_strings_as_vllm_applies_them(pieces, stops, want):
    from serving.engines.sim import StopStrings
    scan, out, stopped = StopStrings(stops), [], False
    for k, p in enumerate(pieces):
        ids, texts, stopped = scan.feed((k,), [p], k == len(pieces) - 1)
        assert len(texts) == len(ids)  # one text per released token
        out.append("".join(texts))
        if stopped:
            break
    assert (out, stopped) == want


WORD = {i: w for i, w in enumerate(" the cat sat on the mat and the dog sat on the log".split(" ")[1:])}


def _answer(stops, cut=None):
    """Released text of a stream of WORD tokens; at token `cut` the engine dies and a new
    one continues from the first token not delivered, as failover does."""
    from serving.engines.sim import StopStrings
    scan, sent, text, i = StopStrings(stops), 0, "", 0
    while i < len(WORD):
        last = i == len(WORD) - 1
        ids, pieces, stopped = scan.feed((i,), [" " + WORD[i]], last)
        sent += len(ids)
        text += "".join(pieces)
        if stopped or last:
            return text, stopped
        i += 1
        if i == cut:  # held tokens die with the engine; the continuation starts at `sent`
            scan, i, cut = StopStrings(stops), sent, None


@pytest.mark.parametrize("stops", [("the dog",), ("sat on the log",), ("mat an",), ("zebra",)])
def test_a_failover_continuation_loses_no_held_text(stops):
    whole = _answer(stops)
    assert whole[0] == " the cat sat on the mat and the dog sat on the log".split(stops[0])[0]
    for cut in range(1, len(WORD)):
        assert _answer(stops, cut) == whole, cut


async def test_sim_engine_ends_at_a_stop_string_and_frees_the_rest():
    eng = SimEngine("e0", model="m", kv_capacity_tokens=50_000)
    _, chunks = await collect(eng, GenerateRequest("full", tuple(range(100)), max_tokens=12, model="m", seed=7))
    full = "".join(c.text for c in chunks)
    stop = full.split()[4]  # the fifth word of the same answer
    _, chunks = await collect(eng, GenerateRequest("s", tuple(range(100)), max_tokens=12, model="m", seed=7,
                                                   stop=("nothing-like-it", stop)))
    text = "".join(c.text for c in chunks)
    assert text == full[:full.index(stop)] and chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < 12
    await asyncio.sleep(0.02)
    assert eng.snapshot().num_running == 0 and eng.core.pool.num_used == 0  # the rest was not generated
    await eng.close()
