"""Config validation: every mistake fails at start-up with the bad key's path first."""

import copy

import pytest

from serving.config import ConfigError, load_config
from serving.engines.factory import EngineSpec, make_engine, register

H = "ab" * 32  # a well-formed sha256 hex digest

BASE = {
    "home_region": "us",
    "rtt_ms": {"us": {"eu": 80}},
    "models": [{"name": "m"}],
    "regions": {"us": {"replicas": 2}, "eu": {"replicas": 1, "profile": "llama3-1b-h100"}},
}


def with_(path: str, value):
    cfg = copy.deepcopy(BASE)
    *head, last = path.split(".")
    node = cfg
    for k in head:
        node = node.setdefault(k, {}) if not k.isdigit() else node[int(k)]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return cfg


CASES = [
    ("unknown-top-key", with_("colour", "blue"), "colour: unknown key"),
    ("home-region-unknown", with_("home_region", "mars"), "home_region: 'mars' is not under regions"),
    ("replicas-negative", with_("regions.us.replicas", -1), "regions.us.replicas: Input should be greater"),
    ("replicas-wrong-type", with_("regions.us.replicas", "two"), "regions.us.replicas: Input should be a valid integer"),
    ("unknown-profile", with_("regions.eu.profile", "h100"), "regions.eu.profile: unknown profile 'h100'"),
    ("unknown-region-key", with_("regions.eu.gpus", 8), "regions.eu.gpus: unknown key"),
    ("kv-zero", with_("regions.us.kv_capacity_tokens", 0), "regions.us.kv_capacity_tokens: Input should be greater"),
    ("unknown-engine-kind", with_("regions.us.engine", {"kind": "tgi"}), "regions.us.engine.kind: unknown engine kind 'tgi'"),
    ("rtt-unknown-server", with_("rtt_ms.us", {"ap": 100}), "rtt_ms.us.ap: unknown region"),
    ("rtt-unknown-client", with_("rtt_ms.ap", {"us": 100}), "rtt_ms.ap: unknown region"),
    ("rtt-negative", with_("rtt_ms.us", {"eu": -5}), "rtt_ms.us.eu: must be >= 0"),
    ("rtt-pair-missing", with_("rtt_ms.us", {"us": 1}), "rtt_ms.us.eu: missing: give every pair"),  # not 0 ms
    ("sim-option-typo", with_("regions.us.engine", {"kind": "sim", "options": {"time_scal": 2}}),
     "regions.us.engine.options: engine options ['time_scal'] are not known to kind 'sim'"),
    ("http-without-url", with_("regions.us.engine", {"kind": "vllm_http", "options": {"served_model": "x"}}),
     "regions.us.engine.options: engine kind 'vllm_http' needs options.url (model 'm')"),
    ("vllm-option-typo", with_("regions.us.engine", {"kind": "vllm", "options": {"model_path": "/m", "engin_args": {}}}),
     "regions.us.engine.options: engine options ['engin_args'] are not known to kind 'vllm'"),
    ("models-empty", with_("models", []), "models: List should have at least 1 item"),
    # autoscaler bounds the policy would clip or overrun (found by a review: accepted, then ignored)
    ("autoscaler-min-over-max", with_("autoscaler", {"min_replicas": 3, "max_replicas": 2}),
     "autoscaler: min_replicas 3 is above max_replicas 2"),
    ("autoscaler-region-min-over-max", with_("autoscaler", {"regions": {"us": {"min_replicas": 5}}, "max_replicas": 4}),
     "autoscaler.regions.us: min_replicas 5 is above max_replicas 4"),
    ("autoscaler-start-over-max", with_("autoscaler", {"max_replicas": 1}), "regions.us.replicas: 2 is outside"),
    ("autoscaler-budget-under-floor", with_("autoscaler", {"budget": 1}), "autoscaler.budget: 1 is below the sum of min"),
    ("autoscaler-budget-under-start", with_("autoscaler", {"budget": 2}),
     "autoscaler.budget: 2 is below the replicas deployed at start (3)"),
    ("unknown-policy", with_("router.policy", "fastest"), "router.policy: unknown policy 'fastest'"),
    ("policy-option-negative", with_("router.options", {"load_weight": -1}),
     "router: tie margins, session_horizon and load_weight must be >= 0"),
    ("policy-option-unknown", with_("router.options", {"weight": 1}),
     "router: bad options for routing policy 'latency'"),
    ("policy-option-type", with_("router.options", {"tie_margin_ms": "x"}),
     "router: bad options for routing policy 'latency': tie_margin_ms must be a number, got 'x'"),
    ("region-model-unknown", with_("regions.us.models", ["m", "x"]), "regions.us.models: unknown model 'x'"),
    ("duplicate-models", with_("models", [{"name": "m"}, {"name": "m"}]), "models: duplicate model names"),
    ("no-models", with_("models", None), "models: Input should be a valid list"),
    ("missing-home", {k: v for k, v in BASE.items() if k != "home_region"}, "home_region: Field required"),
    ("key-not-hashed", with_("auth", {"tenants": {"acme": {"api_keys_sha256": ["sk-plain"]}}}),
     "auth.tenants.acme.api_keys_sha256: entry 0 is not a lowercase sha256 hex digest"),
    ("admin-not-hashed", with_("auth", {"admin_key_sha256": "secret"}), "auth.admin_key_sha256: not a lowercase sha256"),
    ("tenant-region-unknown", with_("auth", {"tenants": {"acme": {"api_keys_sha256": [H], "allowed_regions": ["ap"]}}}),
     "auth.tenants.acme.allowed_regions: unknown region 'ap'"),
    ("resource-missing", with_("serve", {"region_resources": True}), "regions.us.ray_resource: required when"),
    ("mixed-block-sizes", with_("regions.eu.profile", "tiny-cpu"), "regions: profiles mix KV block sizes"),
]


@pytest.mark.parametrize("raw,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_error_names_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert str(e.value).startswith(message), str(e.value)


def test_valid_config_derives_rtt_limits_and_models():
    cfg = load_config(with_("regions.eu.models", ["m"]))
    assert cfg.rtt() == {"us": {"us": 0.0, "eu": 80.0}, "eu": {"us": 80.0, "eu": 0.0}}  # mirrored
    assert cfg.region_models("us") == ["m"]
    assert cfg.max_model_len("m") == 32768  # the profiles' limit, below the KV capacity
    assert load_config(with_("models", [{"name": "m", "max_model_len": 4096}])).max_model_len("m") == 4096
    assert cfg.auth.open and cfg.router.policy == "latency" and cfg.block_size == 16


def test_asymmetric_rtt_entries_are_kept():
    cfg = load_config(with_("rtt_ms", {"us": {"eu": 80}, "eu": {"us": 90}}))
    assert (cfg.rtt()["us"]["eu"], cfg.rtt()["eu"]["us"]) == (80.0, 90.0)


def test_config_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("home_region: [unclosed")
    with pytest.raises(ConfigError, match="^config: not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="^config: cannot read"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a list")
    with pytest.raises(ConfigError, match="^config: the top level must be a mapping"):
        load_config(p)


def test_engine_factory_builds_sim_and_registers_kinds():
    e = make_engine(EngineSpec("sim", "r1", "us", "m", "zero", 1000, {"time_scale": 0.5}))
    assert (e.replica_id, e.region, e.model, e.time_scale, e.profile.name) == ("r1", "us", "m", 0.5, "zero")
    with pytest.raises(ValueError, match="not known to kind 'sim'"):
        make_engine(EngineSpec("sim", "r1", "us", "m", "zero", 1000, {"url": "x"}))
    with pytest.raises(ValueError, match="unknown engine kind 'nope'"):
        make_engine(EngineSpec("nope", "r1", "us", "m", "zero", 1000))
    register("sim-alias", "serving.engines.factory:make_sim")
    try:
        cfg = load_config(with_("regions.us.engine", {"kind": "sim-alias"}))
        assert cfg.regions["us"].engine.kind == "sim-alias"
    finally:
        from serving.engines import factory
        factory.KINDS.pop("sim-alias")


def test_a_region_without_replicas_is_no_pool_of_the_autoscaler():
    """A client-only region (replicas 0: no engine deployment) is outside the autoscaler's bounds."""
    cfg = with_("regions.eu.replicas", 0)
    cfg["autoscaler"] = {"budget": 2}
    assert load_config(cfg).autoscaler.budget == 2
