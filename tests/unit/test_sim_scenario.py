"""Scenario YAML: the issue's example as written, shipped scenarios, errors naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from serving.prefix import hashes_from_ids
from serving.sim import ScenarioError, load, parse
from serving.sim.content import Hasher
from serving.sim.workload import arrivals

SCENARIOS = Path(__file__).resolve().parents[2] / "loadtests" / "scenarios"

ISSUE_YAML = """
seed: 7
duration_s: 900
regions:
  us-east:  {replicas: 4, profile: llama3-8b-h100, kv_capacity_tokens: 200000}
  eu-west:  {replicas: 3, profile: llama3-8b-h100, kv_capacity_tokens: 200000}
  ap-south: {replicas: 2, profile: llama3-8b-h100, kv_capacity_tokens: 200000}
rtt_ms:
  us-east:  {us-east: 2, eu-west: 75, ap-south: 190}
  eu-west:  {us-east: 75, eu-west: 2, ap-south: 120}
  ap-south: {us-east: 190, eu-west: 120, ap-south: 2}
workload:
  - trace: traces/agentic-sample.jsonl
  - generator: voice
    rate_per_s: {us-east: 2, eu-west: 1}
slo: {ttft_ms: 1000, tpot_ms: 50}
policies: [round_robin, power_of_two, cache_aware, weighted, latency]
"""


def test_the_issue_scenario_is_accepted_as_written():
    sc = parse(yaml.safe_load(ISSUE_YAML), base_dir=SCENARIOS)
    assert sc.seed == 7 and sc.duration_s == 900
    assert {r: (x.replicas, x.profile, x.kv_capacity_tokens) for r, x in sc.regions.items()} == {
        "us-east": (4, "llama3-8b-h100", 200000), "eu-west": (3, "llama3-8b-h100", 200000),
        "ap-south": (2, "llama3-8b-h100", 200000)}
    assert sc.rtt_ms["ap-south"]["eu-west"] == 120
    assert [s.kind for s in sc.workload] == ["trace", "voice"]
    assert sc.workload[0].path == (SCENARIOS / "traces" / "agentic-sample.jsonl").resolve()
    assert sc.workload[1].rate_per_s == {"us-east": 2, "eu-west": 1}
    assert (sc.slo_ttft_ms, sc.slo_tpot_ms) == (1000, 50)
    assert [p.label for p in sc.policies] == ["round_robin", "power_of_two", "cache_aware", "weighted",
                                              "latency"]


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_scenarios_load(path):
    sc = load(path)
    assert sc.total_replicas >= 1 and sc.workload


def _bad(mutate):
    d = yaml.safe_load(ISSUE_YAML)
    mutate(d)
    return d


@pytest.mark.parametrize("mutate,key", [
    pytest.param(lambda d: d.pop("duration_s"), "duration_s", id="missing-duration"),
    pytest.param(lambda d: d.update(colour="red"), "colour", id="unknown-top-key"),
    pytest.param(lambda d: d["regions"]["us-east"].update(profile="h900"), "regions.us-east.profile",
                 id="unknown-profile"),
    pytest.param(lambda d: d["regions"]["eu-west"].update(replicas=-1), "regions.eu-west.replicas",
                 id="negative-replicas"),
    pytest.param(lambda d: d["regions"]["eu-west"].update(replica=3), "regions.eu-west.replica",
                 id="typo-in-region"),
    pytest.param(lambda d: d["rtt_ms"]["us-east"].update(mars=9), "rtt_ms.us-east.mars", id="rtt-unknown"),
    pytest.param(lambda d: d["workload"][1]["rate_per_s"].update(mars=1), "workload[1].rate_per_s.mars",
                 id="rate-unknown-region"),
    pytest.param(lambda d: d["workload"][1].update(generator="podcast"), "workload[1].generator",
                 id="unknown-generator"),
    pytest.param(lambda d: d["workload"][1].update(prompt_tokens=5), "workload[1].prompt_tokens",
                 id="knob-of-another-generator"),
    pytest.param(lambda d: d["workload"][1].update(user_tokens=[9, 3]), "workload[1].user_tokens",
                 id="inverted-range"),
    pytest.param(lambda d: d["workload"][0].update(trace="traces/nope.jsonl"), "workload[0].trace",
                 id="missing-trace"),
    pytest.param(lambda d: d["workload"][0].update(generator="voice"), "workload[0]",
                 id="trace-and-generator"),
    pytest.param(lambda d: d["slo"].update(ttft_ms="fast"), "slo.ttft_ms", id="slo-not-a-number"),
    pytest.param(lambda d: d["workload"][1].update(model="gpt-9"), "workload[1].model",
                 id="model-nobody-serves"),
    pytest.param(lambda d: d.update(policies=["round_robin", "fastest"]), "policies[1]",
                 id="unknown-policy"),
    pytest.param(lambda d: d.update(events=[{"at_s": 1, "action": "outage", "region": "mars"}]),
                 "events[0].region", id="event-unknown-region"),
    pytest.param(lambda d: d.update(events=[{"at_s": 1, "action": "explode", "region": "us-east"}]),
                 "events[0].action", id="event-unknown-action"),
])
def test_errors_name_the_bad_key(mutate, key):
    with pytest.raises(ScenarioError) as e:
        parse(_bad(mutate), base_dir=SCENARIOS)
    assert str(e.value).startswith(key), str(e.value)


def test_trace_blocks_map_onto_engine_blocks_and_tenants_never_share(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 3],'
                     ' "tenant": "a"}\n'
                     '{"timestamp": 5, "input_length": 600, "output_length": 5, "hash_ids": [1, 9],'
                     ' "tenant": "a"}\n'
                     '{"timestamp": 9, "input_length": 600, "output_length": 5, "hash_ids": [1, 9],'
                     ' "tenant": "b"}\n')
    d = copy.deepcopy(yaml.safe_load(ISSUE_YAML))
    d["workload"] = [{"trace": str(trace), "region": "us-east"}]
    sc = parse(d, base_dir=tmp_path)
    h = Hasher(16)
    a1, a2, a3 = (h.hashes(a.segments, a.prompt_len, a.model, a.tenant) for a in arrivals(sc))
    assert (len(a1), len(a2)) == (1100 // 16, 600 // 16)
    shared = sum(1 for x, y in zip(a1, a2) if x == y)
    assert shared == 512 // 16  # exactly trace block 1: 32 engine blocks
    assert not set(a3) & set(a2)  # tenant b's salt changes every hash
    # The chain is seeded like the router's own: model and salt.
    assert h.root("default", "a") != h.root("default", "b")
    assert hashes_from_ids([1], "default", "a") != hashes_from_ids([1], "default", "b")


def test_a_generators_typo_lists_every_key_it_may_name():
    """Found by a newcomer review: `rate_per_sec` was answered with only the generator's own
    knobs as allowed, not rate_per_s, diurnal, tenant, ..."""
    with pytest.raises(ScenarioError) as e:
        parse(_bad(lambda d: d["workload"][1].update(rate_per_sec=3)), base_dir=SCENARIOS)
    assert str(e.value).startswith("workload[1].rate_per_sec: unknown key")
    assert "'rate_per_s'" in str(e.value) and "'diurnal'" in str(e.value)
