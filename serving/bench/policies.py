"""Gateway-policy figures in the simulator: a region outage, and delegation under overload.

    python -m serving.bench.policies [--quick]

Prints one JSON object:

- `outage`: the `latency` policy on three regions, with and without one whole
  region crashing for a while. Crashed replicas' requests fail over (re-routed,
  continuing from the tokens already streamed) and the router's circuits keep
  new requests away until the region recovers. Figure: goodput ratio
  outage / no outage (target >= 0.9).
- `delegation`: a large tier overloaded by `auto` traffic, with a small tier
  beside it. Without delegation `auto` means large; with it, each request goes
  through `serving.delegation.choose_tier` with the router's predicted large
  TTFT. Figure: goodput ratio with / without (target >= 1.5).

Both runs of a pair see the identical arrivals (same scenario seed).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from serving.delegation import DelegationConfig, Features, Tier, choose_tier
from serving.sim import Hooks, Simulator, parse
from serving.sim.scenario import PolicySpec
from serving.types import RouteRequest

LATENCY = PolicySpec("latency", "latency")


def outage_scenario(duration_s: float, outage: bool) -> dict:
    region = {"replicas": 4, "profile": "llama3-8b-h100", "kv_capacity_tokens": 200_000}
    sc = {
        "name": "region-outage", "seed": 11, "duration_s": duration_s,
        "regions": {"us": region, "eu": region, "ap": region},
        "rtt_ms": {"us": {"us": 2, "eu": 80, "ap": 150}, "eu": {"eu": 2, "ap": 200},
                   "ap": {"ap": 2}},
        "slo": {"ttft_ms": 1000, "tpot_ms": 100},
        "workload": [{"generator": "agent_sessions", "rate_per_s": {"us": 3.6, "eu": 3.6, "ap": 3.6}},
                     {"generator": "chat", "rate_per_s": {"us": 6, "eu": 6, "ap": 6}}],
    }
    if outage:  # eu goes dark for a third of the run, then comes back
        sc["events"] = [{"at_s": duration_s / 3, "action": "outage", "region": "eu",
                         "duration_s": duration_s / 3}]
    return sc


def delegation_scenario(duration_s: float) -> dict:
    return {
        "name": "overloaded-large-tier", "seed": 12, "duration_s": duration_s,
        "regions": {"us": {"replicas": 2, "profile": "llama3-8b-h100", "model": "llama-8b",
                           "kv_capacity_tokens": 60_000},
                    "us-small": {"replicas": 2, "profile": "llama3-1b-h100", "model": "llama-1b",
                                 "kv_capacity_tokens": 120_000}},
        "rtt_ms": {"us": {"us": 2, "us-small": 2}, "us-small": {"us-small": 2}},
        "slo": {"ttft_ms": 1000, "tpot_ms": 100},
        # The clients call `auto`; the simulator checks that a source's model is served,
        # so the source names the large model and the hook below reads it as `auto`.
        "workload": [{"generator": "no_reuse", "model": "llama-8b", "rate_per_s": {"us": 90},
                      "prompt_tokens": [500, 1500], "output_tokens": [100, 300]}],
    }


TIERS = DelegationConfig((Tier("small", "llama-1b", max_prompt_tokens=8000),
                          Tier("large", "llama-8b")))


class Delegation(Hooks):
    """`auto` -> a tier, as the ingress's delegation stage decides it."""

    def __init__(self, cfg: DelegationConfig, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.reasons: Counter = Counter()

    def delegate(self, sim: Simulator, a) -> str:
        large = self.cfg.tier(self.cfg.large)
        if a.model not in (self.cfg.alias, large.model) or not self.enabled:
            return large.model if a.model == self.cfg.alias else a.model
        slo = a.slo_ttft_ms if a.slo_ttft_ms is not None else sim.sc.slo_ttft_ms

        def predict() -> float:
            hashes = sim.hasher.hashes(a.segments, a.prompt_len, large.model, a.tenant)
            req = RouteRequest("probe", large.model, a.prompt_len, hashes, a.output_len,
                               a.region, None, a.tenant, a.session_id, slo)
            return sim.router.choose(req)[0].predicted_ttft_ms

        choice = choose_tier(self.cfg, Features(a.prompt_len, slo_ttft_ms=slo), predict)
        self.reasons[choice.reason] += 1
        return choice.model


def _run(raw: dict, hooks: Hooks | None = None) -> dict:
    res = Simulator(parse(raw), LATENCY, hooks=hooks).run()
    keep = ("requests", "finished", "failed", "failed_by_reason", "goodput", "goodput_rps",
            "ttft_p50_ms", "ttft_p99_ms", "tpot_p99_ms")
    return {k: res[k] for k in keep}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (for smoke tests)")
    args = p.parse_args(argv)
    d = 60.0 if args.quick else 240.0
    base, out = _run(outage_scenario(d, False)), _run(outage_scenario(d, True))
    off = Delegation(TIERS, False)
    on = Delegation(TIERS, True)
    no_deleg, deleg = _run(delegation_scenario(d / 2), off), _run(delegation_scenario(d / 2), on)
    result = {
        "outage": {"no_outage": base, "outage": out,
                   "goodput_ratio": round(out["goodput"] / max(1e-9, base["goodput"]), 3),
                   "target": ">= 0.9"},
        "delegation": {"without": no_deleg, "with": deleg, "tier_reasons": dict(on.reasons),
                       "goodput_ratio": round(deleg["goodput"] / max(1e-9, no_deleg["goodput"]), 3),
                       "target": ">= 1.5"},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
