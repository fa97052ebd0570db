"""Pure helpers of the real-vLLM engines and benchmark: /metrics parsing, the
pending-prefill estimate, trace records and the prompts made from them."""

from __future__ import annotations

import json

import pytest

from serving.bench.trace import PromptMaker, TraceRecord, load
from serving.engines import prom
from serving.engines.pending import PendingPrefill

PAGE = """# HELP vllm:num_requests_running Number of requests.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_running{engine="1",model_name="tiny"} 3.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 1.5e+03
vllm:prefix_cache_hits_created{engine="0",model_name="tiny"} 1.7e+09
vllm:kv_cache_usage_perc 0.5
vllm:cache_config_info{block_size="128",num_gpu_blocks="256",note="a \\"quoted\\" value"} 1.0
garbage line without value
"""


@pytest.mark.parametrize(("name", "value"), [
    pytest.param("vllm:num_requests_running", 5.0, id="summed-over-engines"),
    pytest.param("vllm:prefix_cache_hits_total", 1500.0, id="exponent"),
    pytest.param("vllm:kv_cache_usage_perc", 0.5, id="no-labels"),
    pytest.param("vllm:cache_config_info", 1.0, id="info"),
])
def test_prom_parse_sums_wanted_samples(name, value):
    values, _ = prom.parse(PAGE, frozenset({name}))
    assert values == {name: value}


def test_prom_parse_keeps_labels_and_ignores_unwanted():
    values, labels = prom.parse(PAGE, frozenset({"vllm:cache_config_info", "vllm:absent"}))
    assert set(values) == {"vllm:cache_config_info"}
    assert labels["vllm:cache_config_info"]["num_gpu_blocks"] == "256"
    assert labels["vllm:cache_config_info"]["block_size"] == "128"


@pytest.mark.parametrize(("first", "second", "expected_second"), [
    pytest.param(list(range(256)), list(range(256)) + [7] * 44, 44, id="two-blocks-cached"),
    pytest.param(list(range(256)), list(range(1, 257)), 256, id="different-first-block"),
    pytest.param(list(range(100)), list(range(100)), 100, id="partial-block-never-cached"),
])
def test_pending_prefill_estimates_uncached_tokens(first, second, expected_second):
    p = PendingPrefill(block_size=128, model="tiny", capacity_blocks=16)
    assert p.add("a", first, None) == len(first)
    assert p.add("b", second, None) == expected_second
    assert p.tokens == len(first) + expected_second
    p.done("a")
    p.done("a")  # idempotent: a stream's first token and its end both report done
    assert (p.tokens, len(p)) == (expected_second, 1)


def test_pending_prefill_salt_capacity_and_reset():
    p = PendingPrefill(block_size=2, model="m", capacity_blocks=2)
    p.add("a", [1, 2, 3, 4], "t1")
    assert p.add("b", [1, 2, 3, 4], "t2") == 4  # another tenant's salt: nothing shared
    assert p.add("c", [1, 2, 3, 4], "t2") == 1  # both blocks now held for t2 (last token always computed)
    assert p.add("d", [1, 2, 3, 4], "t1") == 4  # t1's blocks were evicted (capacity 2 blocks)
    p.clear()
    assert p.add("e", [1, 2, 3, 4], "t1") == 4
    assert p.add("f", [1, 2, 3, 4, 5, 6], "t1") == 2  # 3 blocks, 2 fit: the tail goes, as in vLLM
    assert p.add("g", [1, 2, 3, 4, 5, 6], "t1") == 2  # so the prefix still hits


def test_trace_load_sorts_and_reads_optional_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 50, "input_length": 600, "output_length": 5, "hash_ids": [1, 2],
         "region": "eu", "session_id": "s1", "tenant": "app0"},
        {"timestamp": 10, "input_length": 100, "output_length": 0, "hash_ids": [3]},
    ]) + "\n\n")
    recs = load(path)
    assert [(r.timestamp_ms, r.index, r.output_length) for r in recs] == [(10.0, 1, 1), (50.0, 0, 5)]
    assert (recs[1].region, recs[1].session_id, recs[1].tenant) == ("eu", "s1", "app0")


def test_trace_load_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a Mooncake trace record"):
        load(path)


def _rec(i, length, hashes):
    return TraceRecord(i, 0.0, length, 1, tuple(hashes))


def test_prompts_share_exactly_the_shared_hash_ids():
    pm = PromptMaker(word_ids=list(range(1000, 1100)), words=[f"w{i}" for i in range(100)])
    a = pm.token_ids(_rec(0, 1200, [7, 8, 9]))
    b = pm.token_ids(_rec(1, 1100, [7, 8, 5]))
    c = pm.token_ids(_rec(2, 600, [9, 8]))
    assert (len(a), len(b), len(c)) == (1200, 1100, 600)
    assert a[:1024] == b[:1024] and a[1024:1100] != b[1024:1100]
    assert c[:512] == a[1024:1200] + pm.block(9)[176:512]  # same id, same tokens, wherever it is
    assert set(a) <= set(range(1000, 1100))
    assert pm.token_ids(_rec(0, 1200, [7, 8, 9])) == a  # deterministic
    assert pm.text(a[:3]) == "".join(" w" + str(t - 1000) for t in a[:3])


def test_prompts_pad_when_hash_ids_cover_too_little():
    pm = PromptMaker(word_ids=[1, 2, 3])
    ids = pm.token_ids(_rec(4, 700, [1]))
    assert len(ids) == 700 and ids[:512] == pm.block(1)
