"""The real-vLLM configs: deployments/gpu.yaml and deployments/vllm-cpu.yaml.

The GPU config cannot run here: its Serve application graph is built (Ray's
own builder, no cluster started) and checked deployment by deployment, and
every engine replica's engine is constructed by the factory exactly as the
engine deployment does, without starting vLLM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.config import load_config
from serving.engines.factory import EngineSpec, make_engine
from serving.engines.vllm_engine import VLLMEngine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _salt_secret(monkeypatch):
    monkeypatch.setenv("PROXIMA_CACHE_SALT", "test-secret")  # gpu.yaml reads its salt key from here


def _args(name: str) -> dict:
    return yaml.safe_load((ROOT / "deployments" / name).read_text())["applications"][0]["args"]


def _built(name: str):
    pytest.importorskip("ray")
    from ray.serve._private.build_app import build_app as serve_build

    from deployments.app import build_app

    return {d.name: d for d in serve_build(build_app(_args(name)), name="proxima").deployments}


def _engines(name: str) -> dict[tuple[str, str], VLLMEngine]:
    cfg = load_config(_args(name))
    out = {}
    for region, r in cfg.regions.items():
        for model in cfg.region_models(region):
            spec = EngineSpec(r.engine.kind, f"{region}-x", region, model, r.profile,
                              r.kv_capacity_tokens, dict(r.engine.options))
            out[(region, model)] = make_engine(spec)
    return out


GPU_SHAPES = {  # deployment -> (replicas, ray actor options, placement bundles)
    "engine-us-east-llama3-8b": (4, {"num_cpus": 0, "num_gpus": 1, "resources": {"region-us-east": 0.001}}, None),
    "engine-us-east-llama3-1b": (4, {"num_cpus": 0, "num_gpus": 0.25, "resources": {"region-us-east": 0.001}}, None),
    "engine-eu-west-llama3-8b": (2, {"num_cpus": 0, "num_gpus": 1, "resources": {"region-eu-west": 0.001}}, None),
    "engine-eu-west-llama3-1b": (2, {"num_cpus": 0, "num_gpus": 0.25, "resources": {"region-eu-west": 0.001}}, None),
    "engine-ap-south-llama3-8b": (2, {"num_cpus": 0, "resources": {"region-ap-south": 0.001}},
                                  [{"CPU": 1, "region-ap-south": 0.001}, {"GPU": 1}, {"GPU": 1}]),
    "engine-ap-south-llama3-1b": (2, {"num_cpus": 0, "num_gpus": 0.5, "resources": {"region-ap-south": 0.001}}, None),
}


@pytest.mark.parametrize("deployment", sorted(GPU_SHAPES), ids=sorted(GPU_SHAPES))
def test_gpu_graph_places_each_engine_on_its_region_and_gpus(deployment):
    d = _built("gpu.yaml")[deployment]
    replicas, actor, bundles = GPU_SHAPES[deployment]
    rc = d._replica_config  # Serve's validated replica config (bundles have no public getter)
    assert (d.num_replicas, d.ray_actor_options, rc.placement_group_bundles) == (replicas, actor, bundles)
    if bundles:
        assert rc.placement_group_strategy == "STRICT_PACK"
    region, model = d.init_args[1:]
    assert deployment == f"engine-{region}-{model}"


def test_gpu_graph_has_the_ingress_and_nothing_else():
    built = _built("gpu.yaml")
    assert set(built) == set(GPU_SHAPES) | {"ingress"}
    assert built["ingress"].num_replicas == 3


@pytest.mark.parametrize(("region", "model", "path", "profile", "tp", "gpu_mem"), [
    pytest.param("us-east", "llama3-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama3-8b-h100", 1, 0.90, id="us-large"),
    pytest.param("us-east", "llama3-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama3-1b-h100", 1, 0.22, id="us-small"),
    pytest.param("ap-south", "llama3-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama3-8b-a100", 2, 0.90, id="ap-large-tp2"),
    pytest.param("ap-south", "llama3-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama3-1b-h100", 1, 0.40, id="ap-small"),
])
def test_gpu_engines_are_built_with_per_model_settings(region, model, path, profile, tp, gpu_mem):
    e = _engines("gpu.yaml")[(region, model)]
    assert (e.model_path, e.model, e.profile) == (path, model, profile)
    assert e.engine_args["tensor_parallel_size"] == tp
    assert e.engine_args["gpu_memory_utilization"] == gpu_mem
    assert e.engine is None  # constructed, not started: vLLM is not imported


def test_gpu_tensor_parallel_bundles_match_the_engine():
    cfg = load_config(_args("gpu.yaml"))
    for region, r in cfg.regions.items():
        for model in cfg.region_models(region):
            e = _engines("gpu.yaml")[(region, model)]
            shape = r.placement(model)
            gpus = sum(b.get("GPU", 0) for b in shape.placement_group_bundles or [])
            tp = e.engine_args.get("tensor_parallel_size", 1)
            assert gpus == (tp if tp > 1 else 0), (region, model)
            assert (tp > 1) == (e.engine_args.get("distributed_executor_backend") == "ray"), (region, model)


def test_vllm_cpu_config_one_tiny_engine_per_region_on_distinct_cores():
    cfg = load_config(_args("vllm-cpu.yaml"))
    engines = _engines("vllm-cpu.yaml")
    assert sorted(engines) == [("ap-south", "tiny"), ("eu-west", "tiny"), ("us-east", "tiny")]
    cores = {region: e.env["VLLM_CPU_OMP_THREADS_BIND"] for (region, _), e in engines.items()}
    assert cores == {"us-east": "0", "eu-west": "1", "ap-south": "0"}
    for (region, _), e in engines.items():
        r = cfg.regions[region]
        assert r.replicas == 1 and r.profile == "tiny-cpu"
        assert e.engine_args["num_gpu_blocks_override"] * 128 == r.kv_capacity_tokens
        assert e.engine_args["enforce_eager"] is True
        assert e.model_path == str(ROOT / ".tmp" / "tiny-model")
    built = _built("vllm-cpu.yaml")
    assert {n: d.num_replicas for n, d in built.items()} == {
        "engine-us-east-tiny": 1, "engine-eu-west-tiny": 1, "engine-ap-south-tiny": 1, "ingress": 1}


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({}, "needs options.model_path", id="no-model"),
    pytest.param({"model_path": "m", "tp": 2}, "not known to kind 'vllm'", id="unknown-option"),
    pytest.param({"model_path": "m", "models": {"tiny": {"bogus": 1}}}, "['bogus']", id="unknown-per-model"),
])
def test_vllm_engine_options_are_checked(options, message):
    with pytest.raises(ValueError) as info:
        make_engine(EngineSpec("vllm", "r", "eu", "tiny", "tiny-cpu", 8192, options))
    assert message in str(info.value)


def test_only_the_ingress_is_given_the_keys_and_every_part_names_the_same_actors():
    """Found by a review: every engine deployment was bound with the whole config, keys' hashes
    included, and Serve writes deployments' arguments to its controller's log."""
    pytest.importorskip("ray")
    from serving.ray.ledger import ledger_name
    from serving.ray.router_actor import actor_name, shared_config
    built = _built("gpu.yaml")
    args = _args("gpu.yaml")
    assert args["auth"]
    for name, d in built.items():
        assert ("auth" in d.init_args[0]) == (name == "ingress"), name
    assert actor_name("router", args) == actor_name("router", shared_config(args))
    # a ledger file is one actor whatever config uses it; a memory-only one is its config's
    other = {**args, "router": {**args.get("router", {}), "policy": "power_of_two"}}
    path = load_config(args).budgets.ledger_path
    assert path and ledger_name(path, actor_name("ledger", args)) == ledger_name(path, actor_name("ledger", other))
    assert ledger_name(None, actor_name("ledger", args)) != ledger_name(None, actor_name("ledger", other))
