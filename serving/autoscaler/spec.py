"""The simulator's `autoscaling:` scenario section, validated into typed objects.

    autoscaling:
      tick_s: 5               # control loop period of Proxima's autoscaler
      replica_start_s: 30     # a new replica's cold start (every autoscaler pays it)
      budget: 24              # global replica budget (GPUs: one per replica here)
      min_replicas: 1         # per region; a number or {region: n}
      max_replicas: 16        # likewise
      compare:                # run side by side on the identical arrivals
        - {name: static}                              # the scenario's replicas, never changed
        - {name: static-21, kind: static, replicas: 21}   # a fixed fleet of 21, split evenly
        - {name: serve, kind: serve, target_ongoing_requests: 32}
        - {name: proxima, kind: proxima, replica_cost_ms: 1}

Keys of each `kind` are documented in docs/autoscaling.md; a bad key fails
with a message that names it (`autoscaling.compare[1].upscale_delay: unknown key`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.sim.checks import ScenarioError, as_list, as_mapping, integer, known_keys, number

KINDS = ("static", "serve", "proxima")

# Ray Serve 2.60's AutoscalingConfig defaults, in its own names.
SERVE_DEFAULTS = {"target_ongoing_requests": 2.0, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
                  "look_back_period_s": 30.0, "upscaling_factor": 1.0, "downscaling_factor": 1.0,
                  "control_period_s": 1.0}
# serving.autoscaler.policy.PolicyConfig's knobs, plus the window and the warm start.
PROXIMA_DEFAULTS = {"slo_ttft_ms": None, "slo_weight": 10.0, "max_utilization": 0.85,
                    "replica_cost_ms": 1.0, "hysteresis": 0.15, "upscale_cooldown_s": 30.0,
                    "downscale_delay_s": 300.0, "move_delay_s": 60.0, "lead_s": 60.0,
                    "max_down_step": 2, "window_s": 60.0, "prewarm_frac": 0.25}

# A static fleet of `replicas` in all, split evenly (None: the scenario's own split).
STATIC_DEFAULTS = {"replicas": None}


def even_split(n: int, regions: dict) -> dict[str, int]:
    """n replicas over the regions as evenly as can be; the first regions listed get the remainder."""
    q, r = divmod(n, len(regions))
    return {name: q + (i < r) for i, name in enumerate(regions)}


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)  # defaults filled in


@dataclass(frozen=True, slots=True)
class AutoscalingSpec:
    variants: tuple[Variant, ...]
    tick_s: float = 5.0
    replica_start_s: float = 30.0
    budget: int | None = None
    min_replicas: dict[str, int] = field(default_factory=dict)
    max_replicas: dict[str, int] = field(default_factory=dict)


_KEYS = {"tick_s", "replica_start_s", "budget", "min_replicas", "max_replicas", "compare"}


def parse_autoscaling(raw: Any, regions: dict) -> AutoscalingSpec:
    d = as_mapping(raw, "autoscaling")
    known_keys(d, _KEYS, "autoscaling.")
    lo = _per_region(d.get("min_replicas", 0), "autoscaling.min_replicas", regions)
    hi = _per_region(d.get("max_replicas", 1 << 20), "autoscaling.max_replicas", regions)
    for r in regions:
        if lo[r] > hi[r]:
            raise ScenarioError(f"autoscaling.min_replicas.{r}: above max_replicas ({lo[r]} > {hi[r]})")
    budget = None if d.get("budget") is None else integer(d["budget"], "autoscaling.budget", lo=1)
    if budget is not None and sum(lo.values()) > budget:
        raise ScenarioError(f"autoscaling.budget: {budget} is below the sum of min_replicas")
    variants = []
    for i, v in enumerate(as_list(d.get("compare", [{"name": "proxima", "kind": "proxima"}]),
                                  "autoscaling.compare")):
        k = f"autoscaling.compare[{i}]"
        v = as_mapping(v, k)
        name = str(v.get("name", v.get("kind", "")))
        kind = str(v.get("kind", name))
        if kind not in KINDS:
            raise ScenarioError(f"{k}.kind: unknown autoscaler {kind!r}; known: {list(KINDS)}")
        defaults = {"static": STATIC_DEFAULTS, "serve": SERVE_DEFAULTS, "proxima": PROXIMA_DEFAULTS}[kind]
        opts = {o: val for o, val in v.items() if o not in ("name", "kind")}
        known_keys(opts, set(defaults), k + ".")
        for o, val in opts.items():
            if o == "replicas" and val is not None:
                opts[o] = even_split(integer(val, f"{k}.replicas", lo=1), regions)
            elif val is not None:
                opts[o] = number(val, f"{k}.{o}", lo=0.0)
        variants.append(Variant(name, kind, {**defaults, **opts}))
    names = [v.name for v in variants]
    if not variants or len(set(names)) != len(names):
        raise ScenarioError("autoscaling.compare: needs at least one autoscaler, names unique")
    return AutoscalingSpec(tuple(variants), number(d.get("tick_s", 5.0), "autoscaling.tick_s", lo=0.0, strict=True),
                           number(d.get("replica_start_s", 30.0), "autoscaling.replica_start_s", lo=0.0),
                           budget, lo, hi)


def _per_region(v: Any, k: str, regions: dict) -> dict[str, int]:
    if isinstance(v, dict):
        for r in v:
            if r not in regions:
                raise ScenarioError(f"{k}.{r}: unknown region")
        return {r: integer(v.get(r, 0 if k.endswith("min_replicas") else 1 << 20), f"{k}.{r}", lo=0)
                for r in regions}
    n = integer(v, k, lo=0)
    return dict.fromkeys(regions, n)
