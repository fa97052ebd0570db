"""Simulation scenarios: YAML validated into typed, frozen objects.

Every key is documented in docs/simulation.md. Validation fails with a
`ScenarioError` whose message names the bad key by its path
(`workload[1].rate_per_s.mars: unknown region`), so a typo never runs silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serving.engines.profiles import PROFILES
from serving.routing.policies import POLICIES, make_policy
from serving.sim.checks import (ScenarioError, as_list, as_mapping, integer, known_keys, length_knob,
                                number)

GENERATORS = ("agent_sessions", "shared_prefix", "chat", "voice", "no_reuse")


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    replicas: int
    profile: str
    kv_capacity_tokens: int
    model: str = "default"
    usd_per_hour: float = 0.0


@dataclass(frozen=True, slots=True)
class Diurnal:
    amplitude: float = 0.5  # rate * (1 + amplitude * cos(2 pi (t - peak_s) / period_s))
    period_s: float = 86400.0
    peak_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # "trace" or a generator name
    path: Path | None = None  # trace only, resolved against the scenario file
    rate_per_s: dict[str, float] = field(default_factory=dict)  # client region -> rate
    diurnal: Diurnal | None = None
    params: dict[str, Any] = field(default_factory=dict)  # generator knobs (see workload)
    tenant: str = ""
    model: str = "default"
    slo_ttft_ms: float | None = None  # per-source SLO override (voice defaults tighter)
    time_scale: float = 1.0  # trace only: timestamps are multiplied by this
    default_region: str | None = None  # trace only: for records without a region
    start_s: float = 0.0
    end_s: float | None = None


@dataclass(frozen=True, slots=True)
class Event:
    at_s: float
    action: str  # "outage" (replicas crash) or "recover"
    region: str
    replicas: int | None = None  # None = every replica of the region
    duration_s: float | None = None  # outage only: recover after this long


@dataclass(frozen=True, slots=True)
class PolicySpec:
    label: str
    policy: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scenario:
    seed: int
    duration_s: float
    regions: dict[str, Region]
    rtt_ms: dict[str, dict[str, float]]
    workload: tuple[Source, ...]
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    policies: tuple[PolicySpec, ...] = (PolicySpec("latency", "latency"),)
    snapshot_interval_ms: float = 200.0
    drain_s: float = 600.0  # after duration_s, requests still running this long are failed
    max_retries: int = 2  # reroutes of a request whose replica crashed
    events: tuple[Event, ...] = ()
    name: str = "scenario"
    autoscaling: Any = None  # serving.autoscaler.spec.AutoscalingSpec: autoscalers to compare

    @property
    def total_replicas(self) -> int:
        return sum(r.replicas for r in self.regions.values())


# --- loading ------------------------------------------------------------------
def load(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ScenarioError(f"{path}: cannot read scenario: {e}") from None
    return parse(raw, base_dir=path.parent, name=path.stem)


_TOP = {"seed", "duration_s", "regions", "rtt_ms", "workload", "slo", "policies", "name",
        "snapshot_interval_ms", "drain_s", "max_retries", "events", "autoscaling"}


def parse(raw: Any, base_dir: Path | str = ".", name: str = "scenario") -> Scenario:
    d = as_mapping(raw, "scenario")
    known_keys(d, _TOP, "")
    for key in ("duration_s", "regions", "workload"):
        if key not in d:
            raise ScenarioError(f"{key}: required")
    regions = _regions(d["regions"])
    rtt = _rtt(d.get("rtt_ms", {}), regions)
    slo = as_mapping(d.get("slo", {}), "slo")
    known_keys(slo, {"ttft_ms", "tpot_ms"}, "slo.")
    known_regions = set(regions) | set(rtt)
    workload = tuple(_source(s, f"workload[{i}]", Path(base_dir), known_regions)
                     for i, s in enumerate(as_list(d["workload"], "workload")))
    if not workload:
        raise ScenarioError("workload: needs at least one source")
    served = {r.model for r in regions.values()}
    for i, src in enumerate(workload):
        if src.model not in served:
            raise ScenarioError(f"workload[{i}].model: no region serves {src.model!r}; served: {sorted(served)}")
    sc = Scenario(
        seed=integer(d.get("seed", 0), "seed"),
        duration_s=number(d["duration_s"], "duration_s", lo=0.0, strict=True),
        regions=regions, rtt_ms=rtt, workload=workload,
        slo_ttft_ms=number(slo.get("ttft_ms", 1000.0), "slo.ttft_ms", lo=0.0, strict=True),
        slo_tpot_ms=number(slo.get("tpot_ms", 100.0), "slo.tpot_ms", lo=0.0, strict=True),
        policies=_policies(d.get("policies", ["latency"])),
        snapshot_interval_ms=number(d.get("snapshot_interval_ms", 200.0), "snapshot_interval_ms",
                                  lo=0.0, strict=True),
        drain_s=number(d.get("drain_s", 600.0), "drain_s", lo=0.0),
        max_retries=integer(d.get("max_retries", 2), "max_retries", lo=0),
        events=tuple(_event(e, f"events[{i}]", regions)
                     for i, e in enumerate(as_list(d.get("events", []), "events"))),
        name=str(d.get("name", name)),
        autoscaling=_autoscaling(d.get("autoscaling"), regions))
    return sc


def _autoscaling(raw: Any, regions: dict[str, Region]):
    if raw is None:
        return None
    from serving.autoscaler.spec import parse_autoscaling  # the autoscaler owns its keys
    return parse_autoscaling(raw, regions)


def _regions(raw: Any) -> dict[str, Region]:
    d = as_mapping(raw, "regions")
    if not d:
        raise ScenarioError("regions: needs at least one region")
    out = {}
    for name, spec in d.items():
        k = f"regions.{name}"
        s = as_mapping(spec, k)
        known_keys(s, {"replicas", "profile", "kv_capacity_tokens", "model", "usd_per_hour"}, k + ".")
        profile = str(s.get("profile", "llama3-8b-h100"))
        if profile not in PROFILES:
            raise ScenarioError(f"{k}.profile: unknown engine profile {profile!r}; known: {sorted(PROFILES)}")
        out[str(name)] = Region(
            str(name), integer(s.get("replicas", 1), k + ".replicas", lo=0), profile,
            integer(s.get("kv_capacity_tokens", 200_000), k + ".kv_capacity_tokens", lo=1),
            str(s.get("model", "default")), number(s.get("usd_per_hour", 0.0), k + ".usd_per_hour", lo=0.0))
    if sum(r.replicas for r in out.values()) < 1:
        raise ScenarioError("regions: at least one replica is needed")
    sizes = {PROFILES[r.profile].block_size for r in out.values()}
    if len(sizes) > 1:
        raise ScenarioError(f"regions: profiles mix KV block sizes {sorted(sizes)}; use one block size")
    return out


def _rtt(raw: Any, regions: dict[str, Region]) -> dict[str, dict[str, float]]:
    d = as_mapping(raw, "rtt_ms")
    out: dict[str, dict[str, float]] = {}
    for client, row in d.items():
        r = as_mapping(row, f"rtt_ms.{client}")
        out[str(client)] = {str(k): number(v, f"rtt_ms.{client}.{k}", lo=0.0) for k, v in r.items()}
    for client, row in out.items():
        for server in row:
            if server not in regions:
                raise ScenarioError(f"rtt_ms.{client}.{server}: unknown region (not under regions)")
    for client, row in out.items():  # fill the symmetric entry when only one side is given
        for server in regions:
            if server not in row and client in out.get(server, {}):
                row[server] = out[server][client]
    return out


def _source(raw: Any, k: str, base_dir: Path, known_regions: set[str]) -> Source:
    s = as_mapping(raw, k)
    common = {"rate_per_s", "diurnal", "tenant", "model", "slo", "start_s", "end_s"}
    if ("trace" in s) == ("generator" in s):
        raise ScenarioError(f"{k}: needs exactly one of `trace` or `generator`")
    slo_ttft = None
    if "slo" in s:
        slo = as_mapping(s["slo"], k + ".slo")
        known_keys(slo, {"ttft_ms"}, k + ".slo.")
        slo_ttft = number(slo.get("ttft_ms"), k + ".slo.ttft_ms", lo=0.0, strict=True)
    start = number(s.get("start_s", 0.0), k + ".start_s", lo=0.0)
    end = None if s.get("end_s") is None else number(s["end_s"], k + ".end_s", lo=start)
    if "trace" in s:
        known_keys(s, {"trace", "time_scale", "region", "tenant", "model", "slo", "start_s", "end_s"}, k + ".")
        path = (base_dir / str(s["trace"])).resolve()
        if not path.is_file():
            raise ScenarioError(f"{k}.trace: no such file {path}")
        region = s.get("region")
        if region is not None and str(region) not in known_regions:
            raise ScenarioError(f"{k}.region: unknown region {region!r}")
        return Source("trace", path=path, tenant=str(s.get("tenant", "")), model=str(s.get("model", "default")),
                      slo_ttft_ms=slo_ttft, time_scale=number(s.get("time_scale", 1.0), k + ".time_scale",
                                                             lo=0.0, strict=True),
                      default_region=None if region is None else str(region), start_s=start, end_s=end)
    from serving.sim.workload import GENERATOR_PARAMS  # the generators own their knobs
    gen = str(s["generator"])
    if gen not in GENERATORS:
        raise ScenarioError(f"{k}.generator: unknown generator {gen!r}; known: {list(GENERATORS)}")
    params = {p: v for p, v in s.items() if p not in common and p != "generator"}
    known_keys(params, set(GENERATOR_PARAMS[gen]) | common | {"generator"}, k + ".")  # all it may name
    for p, v in params.items():
        length_knob(v, f"{k}.{p}")
    if "rate_per_s" not in s:
        raise ScenarioError(f"{k}.rate_per_s: required for a generator")
    rate = s["rate_per_s"]
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        total = number(rate, k + ".rate_per_s", lo=0.0)
        regions = sorted(known_regions)
        rates = {r: total / len(regions) for r in regions}
    else:
        rates = {}
        for r, v in as_mapping(rate, k + ".rate_per_s").items():
            if str(r) not in known_regions:
                raise ScenarioError(f"{k}.rate_per_s.{r}: unknown region")
            rates[str(r)] = number(v, f"{k}.rate_per_s.{r}", lo=0.0)
    diurnal = None
    if s.get("diurnal") is not None:
        dd = as_mapping(s["diurnal"], k + ".diurnal")
        known_keys(dd, {"amplitude", "period_s", "peak_s"}, k + ".diurnal.")
        diurnal = Diurnal(number(dd.get("amplitude", 0.5), k + ".diurnal.amplitude", lo=0.0, hi=1.0),
                          number(dd.get("period_s", 86400.0), k + ".diurnal.period_s", lo=0.0, strict=True),
                          number(dd.get("peak_s", 0.0), k + ".diurnal.peak_s"))
    return Source(gen, rate_per_s=rates, diurnal=diurnal, params=params, tenant=str(s.get("tenant", "")),
                  model=str(s.get("model", "default")),
                  slo_ttft_ms=slo_ttft if slo_ttft is not None else (300.0 if gen == "voice" else None),
                  start_s=start, end_s=end)


def _policies(raw: Any) -> tuple[PolicySpec, ...]:
    out = []
    for i, p in enumerate(as_list(raw, "policies")):
        k = f"policies[{i}]"
        if isinstance(p, str):
            spec = PolicySpec(p, p)
        else:
            d = as_mapping(p, k)
            known_keys(d, {"name", "policy", "options"}, k + ".")
            pol = str(d.get("policy", d.get("name", "")))
            spec = PolicySpec(str(d.get("name", pol)), pol, dict(as_mapping(d.get("options", {}), k + ".options")))
        if spec.policy not in POLICIES:
            raise ScenarioError(f"{k}: unknown routing policy {spec.policy!r}; known: {sorted(POLICIES)}")
        try:
            make_policy(spec.policy, **spec.options)
        except (ValueError, TypeError) as e:
            raise ScenarioError(f"{k}.options: {e}") from None
        out.append(spec)
    labels = [p.label for p in out]
    if len(set(labels)) != len(labels) or not out:
        raise ScenarioError("policies: needs at least one policy, names unique")
    return tuple(out)


def _event(raw: Any, k: str, regions: dict[str, Region]) -> Event:
    d = as_mapping(raw, k)
    known_keys(d, {"at_s", "action", "region", "replicas", "duration_s"}, k + ".")
    action = str(d.get("action", ""))
    if action not in ("outage", "recover"):
        raise ScenarioError(f"{k}.action: must be `outage` or `recover`")
    region = str(d.get("region", ""))
    if region not in regions:
        raise ScenarioError(f"{k}.region: unknown region {region!r}")
    n = d.get("replicas")
    return Event(number(d.get("at_s"), k + ".at_s", lo=0.0), action, region,
                 None if n is None else integer(n, k + ".replicas", lo=1),
                 None if d.get("duration_s") is None else number(d["duration_s"], k + ".duration_s", lo=0.0))
