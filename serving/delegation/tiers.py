"""Tier choice for the `auto` alias: rules first, then load.

In order, the first that applies wins (reason codes are a fixed set, for metrics):

    header            x-proxima-tier names a tier                  -> that tier
    long_prompt       prompt longer than the small tier takes       -> large
    tools             the request carries tools                     -> large
    response_format   a JSON response_format, no cascade possible   -> large
    short_prompt      prompt at most `short_prompt_tokens`          -> small
    large_unavailable no allowed large replica is up                -> small
    large_overloaded  predicted large TTFT > the request's SLO      -> small
    default                                                         -> the default tier

Then one constraint: `tool_choice` auto needs a tool parser to read the calls.
If the tier chosen by a rule other than `header` has none and another tier has
one and takes the prompt, that tier serves (`tool_parser`); otherwise the
request is refused with a 400 once its model is bound, as a model's own name
would be.

"Load" is the router's own prediction for the large tier (RTT + queue + prefill,
computed with the request's allowed regions), so delegation and routing agree on
what "too slow" means and delegation can never pick a region routing could not.
A request whose TTFT SLO is unknown is never delegated for load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from serving.errors import InvalidRequest, NoReplicaAvailable

HEADER = "x-proxima-tier"
REASONS = ("header", "long_prompt", "tools", "response_format", "short_prompt",
           "large_unavailable", "large_overloaded", "default", "cascade", "tool_parser")


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    model: str  # the engine model name this tier's replicas serve
    default_max_tokens: int = 256
    max_prompt_tokens: int | None = None
    reads_tools: bool = True  # its model has a tool parser (`tool_choice` auto can be served)


@dataclass(frozen=True, slots=True)
class DelegationConfig:
    tiers: tuple[Tier, ...]
    small: str = "small"
    large: str = "large"
    default: str = "large"
    alias: str = "auto"
    short_prompt_tokens: int = 0  # 0 = off
    large_for_tools: bool = True
    cascade: bool = False  # JSON response_format may try small first, checked, then large

    def __post_init__(self) -> None:
        names = {t.name for t in self.tiers}
        for key in ("small", "large", "default"):
            if getattr(self, key) not in names:
                raise ValueError(f"delegation.{key}: tier {getattr(self, key)!r} is not one of "
                                 f"{sorted(names)}")

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise InvalidRequest(f"Unknown model tier `{name}`; known tiers: "
                             f"{sorted(t.name for t in self.tiers)}.", param=HEADER)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DelegationConfig":
        d = dict(d)
        try:
            tiers = tuple(Tier(name=n, **t) for n, t in d.pop("tiers").items())
            return cls(tiers=tiers, **d)
        except TypeError as e:
            raise ValueError(f"delegation: {e}") from None
        except KeyError:
            raise ValueError("delegation.tiers: required") from None


@dataclass(frozen=True, slots=True)
class Features:
    """What the rules look at, taken from the request once at ingress."""

    prompt_tokens: int
    has_tools: bool = False
    json_format: bool = False  # response_format json_object / json_schema
    header_tier: str | None = None
    slo_ttft_ms: float | None = None
    stream: bool = False
    needs_tool_parser: bool = False  # tools with `tool_choice` auto: the calls must be parsed


@dataclass(frozen=True, slots=True)
class TierChoice:
    tier: str
    model: str
    reason: str
    detail: str = ""
    check_then_large: bool = False  # cascade: check the small answer, redo on large if it fails

    def headers(self) -> dict[str, str]:
        h = {"x-proxima-tier": self.tier, "x-proxima-tier-reason": self.reason}
        if self.detail:
            h["x-proxima-tier-detail"] = self.detail
        return h


def choose_tier(cfg: DelegationConfig, f: Features,
                predict_large_ttft_ms: Callable[[], float] | None = None) -> TierChoice:
    """Pick a tier; `predict_large_ttft_ms` raises NoReplicaAvailable if none is allowed/up."""
    choice = _by_rules(cfg, f, predict_large_ttft_ms)
    if not f.needs_tool_parser or choice.reason == "header" or cfg.tier(choice.tier).reads_tools:
        return choice
    for t in sorted(cfg.tiers, key=lambda t: t.name != cfg.large):  # the large tier first
        if t.reads_tools and (t.max_prompt_tokens is None or f.prompt_tokens <= t.max_prompt_tokens):
            return TierChoice(t.name, t.model, "tool_parser",
                              f"tier {choice.tier} has no tool parser for tool_choice auto")
    return choice


def _by_rules(cfg: DelegationConfig, f: Features,
              predict_large_ttft_ms: Callable[[], float] | None) -> TierChoice:
    small, large = cfg.tier(cfg.small), cfg.tier(cfg.large)

    def pick(t: Tier, reason: str, detail: str = "") -> TierChoice:
        cascade = (cfg.cascade and f.json_format and not f.stream and t.name == small.name
                   and reason != "header")
        return TierChoice(t.name, t.model, reason, detail, cascade)

    if f.header_tier:
        return pick(cfg.tier(f.header_tier.strip()), "header")
    if small.max_prompt_tokens is not None and f.prompt_tokens > small.max_prompt_tokens:
        return pick(large, "long_prompt", f"{f.prompt_tokens}>{small.max_prompt_tokens} tokens")
    if f.has_tools and cfg.large_for_tools:
        return pick(large, "tools")
    if f.json_format and not (cfg.cascade and not f.stream):
        return pick(large, "response_format")
    if cfg.short_prompt_tokens and f.prompt_tokens <= cfg.short_prompt_tokens:
        return pick(small, "short_prompt", f"{f.prompt_tokens}<={cfg.short_prompt_tokens} tokens")
    if predict_large_ttft_ms is not None and (f.slo_ttft_ms is not None
                                              or cfg.default == large.name):
        try:
            predicted = predict_large_ttft_ms()
        except NoReplicaAvailable as e:
            return pick(small, "large_unavailable", e.message[:120])
        if f.slo_ttft_ms is not None and predicted > f.slo_ttft_ms:
            return pick(small, "large_overloaded",
                        f"predicted {predicted:.0f}ms > slo {f.slo_ttft_ms:.0f}ms")
    return pick(cfg.tier(cfg.default), "default")
