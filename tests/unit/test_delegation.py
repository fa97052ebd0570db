"""Tier choice for `auto`: rules, load, cascade."""

import pytest

from serving.delegation import DelegationConfig, Features, Tier, choose_tier, passes_check
from serving.errors import InvalidRequest, ResidencyUnavailable

CFG = DelegationConfig((Tier("small", "llama-1b", max_prompt_tokens=4000),
                        Tier("large", "llama-8b")), short_prompt_tokens=8)
CASCADE = DelegationConfig(CFG.tiers, cascade=True)


def predicted(ms):
    return lambda: ms


def unavailable():
    raise ResidencyUnavailable("No healthy replica of `llama-8b` in the allowed regions ['eu']")


@pytest.mark.parametrize("cfg,features,predict,tier,reason", [
    (CFG, Features(100, header_tier="small", has_tools=True), None, "small", "header"),
    (CFG, Features(5000, slo_ttft_ms=10), predicted(500), "large", "long_prompt"),
    (CFG, Features(100, has_tools=True, slo_ttft_ms=10), predicted(500), "large", "tools"),
    (CFG, Features(100, json_format=True, slo_ttft_ms=10), predicted(500), "large", "response_format"),
    (CFG, Features(5), predicted(50), "small", "short_prompt"),
    (CFG, Features(100, slo_ttft_ms=200), predicted(450), "small", "large_overloaded"),
    (CFG, Features(100, slo_ttft_ms=200), predicted(150), "large", "default"),
    (CFG, Features(100), predicted(10_000), "large", "default"),  # no SLO: never for load
    (CFG, Features(100), unavailable, "small", "large_unavailable"),
    (CASCADE, Features(100, json_format=True, slo_ttft_ms=200), predicted(450), "small",
     "large_overloaded"),
    (CASCADE, Features(100, json_format=True, stream=True, slo_ttft_ms=200), predicted(450),
     "large", "response_format"),  # a stream can't be taken back: no cascade
], ids=["header-wins", "long-prompt", "tools", "json-no-cascade", "short", "overloaded",
        "fast-enough", "no-slo", "large-unavailable", "json-cascade", "json-stream"])
def test_choose_tier(cfg, features, predict, tier, reason):
    c = choose_tier(cfg, features, predict)
    assert (c.tier, c.reason) == (tier, reason)
    assert c.model == cfg.tier(tier).model
    assert c.headers()["x-proxima-tier"] == tier and c.headers()["x-proxima-tier-reason"] == reason
    assert c.check_then_large == (cfg.cascade and features.json_format and tier == "small")


NO_PARSER_LARGE = DelegationConfig((Tier("small", "llama-1b", max_prompt_tokens=4000),
                                   Tier("large", "llama-8b", reads_tools=False)), short_prompt_tokens=8)
NO_PARSER_SMALL = DelegationConfig((Tier("small", "llama-1b", reads_tools=False), Tier("large", "llama-8b")),
                                   short_prompt_tokens=8, large_for_tools=False)


@pytest.mark.parametrize("cfg,features,predict,tier,reason", [
    # `tools` sends it large, whose model reads no calls: the small tier, which does
    (NO_PARSER_LARGE, Features(100, has_tools=True, needs_tool_parser=True), predicted(50), "small",
     "tool_parser"),
    # ... unless the prompt is beyond the small tier: kept (bind refuses it with the model's 400)
    (NO_PARSER_LARGE, Features(5000, has_tools=True, needs_tool_parser=True), predicted(50), "large",
     "long_prompt"),
    # tool_choice required/named needs no parser: the rules stand
    (NO_PARSER_LARGE, Features(100, has_tools=True), predicted(50), "large", "tools"),
    # overloaded large would delegate to a small tier that cannot read the calls: large serves
    (NO_PARSER_SMALL, Features(100, has_tools=True, needs_tool_parser=True, slo_ttft_ms=200), predicted(450),
     "large", "tool_parser"),
    (NO_PARSER_SMALL, Features(5, has_tools=True, needs_tool_parser=True), predicted(50), "large",
     "tool_parser"),
    # a header is what the client asked for: kept
    (NO_PARSER_SMALL, Features(5, has_tools=True, needs_tool_parser=True, header_tier="small"), None, "small",
     "header"),
], ids=["large-without-parser", "prompt-too-long-for-small", "no-parser-needed", "overloaded-small-reads-none",
        "short-small-reads-none", "header-kept"])
def test_tool_choice_auto_goes_to_a_tier_with_a_parser(cfg, features, predict, tier, reason):
    c = choose_tier(cfg, features, predict)
    assert (c.tier, c.reason) == (tier, reason)
    if reason == "tool_parser":
        assert c.detail.endswith("has no tool parser for tool_choice auto") and not c.check_then_large


def test_overload_detail_in_headers():
    c = choose_tier(CFG, Features(100, slo_ttft_ms=200), predicted(450))
    assert c.headers()["x-proxima-tier-detail"] == "predicted 450ms > slo 200ms"


def test_unknown_header_tier_is_400():
    with pytest.raises(InvalidRequest, match="Unknown model tier `huge`") as e:
        choose_tier(CFG, Features(10, header_tier="huge"))
    assert e.value.status == 400 and e.value.param == "x-proxima-tier"


@pytest.mark.parametrize("fmt,text,ok", [
    ({"type": "json_object"}, '{"a": 1}', True),
    ({"type": "json_object"}, "the router sends", False),
    ({"type": "json_object"}, "[1, 2]", False),
    ({"type": "json_schema", "json_schema": {"schema": {"required": ["a"]}}}, '{"a": 1}', True),
    ({"type": "json_schema", "json_schema": {"schema": {"required": ["b"]}}}, '{"a": 1}', False),
    ({"type": "text"}, "anything", True),
    (None, "anything", True),
], ids=["object", "not-json", "array", "schema-ok", "schema-missing-key", "text", "none"])
def test_passes_check(fmt, text, ok):
    assert passes_check(fmt, text) is ok


@pytest.mark.parametrize("bad,msg", [
    ({"tiers": {"small": {"model": "a"}}}, "delegation.large"),
    ({"tiers": {"small": {"model": "a", "size": 3}, "large": {"model": "b"}}}, "size"),
    ({}, "delegation.tiers: required"),
], ids=["missing-large", "unknown-tier-key", "no-tiers"])
def test_config_errors_name_the_key(bad, msg):
    with pytest.raises(ValueError, match=msg):
        DelegationConfig.from_dict(bad)
