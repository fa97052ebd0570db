"""The gateway's YAML config, validated into typed objects at start-up.

    home_region: us-east            # client region when a request names none
    rtt_ms: {us-east: {eu-west: 80}} # one-way entries are mirrored; missing = 0
    router: {policy: latency, options: {}, alternatives: 3, snapshot_period_s: 0.2}
    models: [{name: llama3-8b, max_model_len: 8192, default_max_tokens: 256}]
    regions:
      us-east: {replicas: 2, profile: llama3-8b-h100, kv_capacity_tokens: 200000,
                models: [llama3-8b], engine: {kind: sim, options: {time_scale: 1.0}}}
    auth: {admin_key_sha256: <hex>, tenants: {acme: {api_keys_sha256: [<hex>],
                                                     allowed_regions: [eu-west]}}}
    serve: {ingress_replicas: 1, ingress_max_ongoing_requests: 512,
            engine_max_ongoing_requests: 512, region_resources: false, inject_rtt: true}

Every key is documented in docs/configuration.md. `load_config` fails with a
ConfigError whose message starts with the bad key's path
(`regions.eu-west.profile: unknown profile 'h100'`), so a typo never starts.
API keys are stored only as sha256 hex digests (see serving.ingress.auth).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.engines.factory import check_options, known_kinds
from serving.engines.profiles import PROFILES
from serving.routing.policies import POLICIES, make_policy

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """A config is invalid; the message starts with the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Strict):
    kind: str = "sim"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in known_kinds():
            raise ValueError(f"unknown engine kind {v!r}; known: {known_kinds()}")
        return v


class ModelPlacement(_Strict):
    """Ray resources of one model's engine replicas (e.g. a small model on a GPU slice)."""

    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    placement_group_bundles: list[dict[str, float]] | None = None


class RegionConfig(_Strict):
    replicas: int = Field(ge=0)
    profile: str = "llama3-8b-h100"
    kv_capacity_tokens: int = Field(default=200_000, gt=0)
    models: list[str] | None = None  # None = every configured model
    engine: EngineConfig = Field(default_factory=EngineConfig)
    ray_resource: str | None = None  # custom Ray resource pinning this region's replicas
    # Per engine replica, merged over {"num_cpus": 0}: e.g. {num_gpus: 1} for a one-GPU
    # vLLM engine. With tensor parallelism, give the bundles instead (the replica's
    # own first, then one {GPU: 1} per rank); vLLM's Ray executor fills them.
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    per_model: dict[str, ModelPlacement] = Field(default_factory=dict)  # overrides by model name

    def placement(self, model: str) -> ModelPlacement:
        """This model's replica shape here: the region's, with the model's overrides."""
        own = self.per_model.get(model)
        return ModelPlacement(
            ray_actor_options={**self.ray_actor_options, **(own.ray_actor_options if own else {})},
            placement_group_bundles=(own.placement_group_bundles  # [] here: no bundles for it
                                     if own is not None and own.placement_group_bundles is not None
                                     else self.placement_group_bundles))

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        if v not in PROFILES:
            raise ValueError(f"unknown profile {v!r}; known: {sorted(PROFILES)}")
        return v


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    max_model_len: int | None = Field(default=None, gt=0)  # None = the smallest replica's limit
    default_max_tokens: int = Field(default=256, gt=0)
    # the model's Hugging Face tokenizer (hub name, or a directory; relative ones from the
    # repository root): chat is rendered with its template and engines get its token ids
    # (serving.ingress.hf_tokenizer). None: the word tokenizer and fixed template (sim engines)
    tokenizer: str | None = None
    # how `tool_choice: auto` answers are read for tool calls (serving.ingress.tools): "hermes"
    # (<tool_call>{json}</tool_call>: Qwen2.5/3, Hermes), "llama3_json" ({json}; {json}: Llama
    # 3.1-3.3), "qwen3_coder" (<tool_call><function=NAME><parameter=KEY>value</parameter>...:
    # Qwen3-Coder, values typed by the tool's schema). None: such answers are content
    tool_parser: Literal["hermes", "llama3_json", "qwen3_coder", "pythonic", "llama4_pythonic"] | None = None

    @field_validator("tool_parser")
    @classmethod
    def _parser_alias(cls, v: str | None) -> str | None:
        return "pythonic" if v == "llama4_pythonic" else v  # vLLM's name for the same format
    # a reasoning model's <think>...</think> leaves as the message's `reasoning`, apart from the
    # content (serving.ingress.answer): "deepseek_r1" (reasoning until </think>) or "qwen3"
    # (reasoning if the answer opens with <think>). None: it is content
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = None


class RouterConfig(_Strict):
    policy: str = "latency"
    options: dict[str, Any] = Field(default_factory=dict)
    alternatives: int = Field(default=3, ge=0)
    snapshot_period_s: float = Field(default=0.2, gt=0, le=5)
    stale_after_s: float = Field(default=3.0, gt=0)  # no snapshot for this long: replica dropped
    direct_channel: bool = True  # ingress -> router over a TCP channel (serving.ray.channel), Ray as fallback
    idle_exit_s: float = Field(default=900.0, ge=0)  # no engine report this long: the router actor exits (0: never)

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; known: {sorted(POLICIES)}")
        return v

    @model_validator(mode="after")
    def _options(self) -> "RouterConfig":
        # Build the policy once here, so bad options fail at config load with their key,
        # not later inside the router actor as the app starts.
        make_policy(self.policy, **self.options)
        return self


class BudgetLimits(_Strict):
    """A tenant's token budget (serving.admission); a missing limit is unlimited."""

    tokens_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_day: int | None = Field(default=None, gt=0)
    session_tokens: int | None = Field(default=None, gt=0)
    session_tokens_per_minute: int | None = Field(default=None, gt=0)


_EMPTY_KEY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256(b"")


class TenantConfig(_Strict):
    api_keys_sha256: list[str] = Field(default_factory=list)
    allowed_regions: list[str] | None = None
    budget: BudgetLimits | None = None
    cache: Literal["private", "shared"] = "private"  # shared: one salt with other opted-in tenants

    @field_validator("api_keys_sha256")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for i, h in enumerate(v):
            if not _HEX64.match(h):
                raise ValueError(f"entry {i} is not a lowercase sha256 hex digest (64 hex characters); "
                                 "store hashes, never keys")
        return v


class AuthConfig(_Strict):
    admin_key_sha256: str | None = None
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    cache_salt_secret: str = "proxima"  # HMAC key of the per-tenant cache salts
    # or the name of an environment variable that holds it: Ray Serve logs an application's
    # arguments (the config) in its controller's log, and a secret in them would be written there
    cache_salt_secret_env: str | None = None

    @model_validator(mode="after")
    def _salt_from_env(self) -> "AuthConfig":
        name = self.cache_salt_secret_env
        if name is not None:
            if "cache_salt_secret" in self.model_fields_set:
                raise ValueError("set cache_salt_secret or cache_salt_secret_env, not both")
            if not os.environ.get(name):
                raise ValueError(f"cache_salt_secret_env: the environment variable {name!r} is not set "
                                 "(or is empty) in this process")
        return self

    def salt_secret(self) -> str:
        """The HMAC key of the cache salts: from the environment if the config names a variable."""
        return os.environ[self.cache_salt_secret_env] if self.cache_salt_secret_env else self.cache_salt_secret

    @field_validator("admin_key_sha256")
    @classmethod
    def _admin(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v):
            raise ValueError("not a lowercase sha256 hex digest (64 hex characters)")
        return v

    @model_validator(mode="after")
    def _one_owner_per_key(self) -> "AuthConfig":
        """A key names one principal: a hash under two tenants (or a tenant and the admin) would
        let one tenant's key act as the other; the empty key's hash would admit a request with
        no key at all."""
        owner: dict[str, str] = {}
        for name, t in self.tenants.items():
            for h in t.api_keys_sha256:
                if h in owner and owner[h] != name:
                    raise ValueError(f"the same API key hash is configured for tenants {owner[h]!r} and {name!r}")
                owner[h] = name
        if self.admin_key_sha256 is not None and self.admin_key_sha256 in owner:
            raise ValueError(f"the admin key hash is also tenant {owner[self.admin_key_sha256]!r}'s API key")
        if _EMPTY_KEY in owner or self.admin_key_sha256 == _EMPTY_KEY:
            raise ValueError("a key hash is the sha256 of the empty string: it would admit requests "
                             "that send no key")
        return self

    @property
    def open(self) -> bool:
        return not any(t.api_keys_sha256 for t in self.tenants.values())


class ServeConfig(_Strict):
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_max_ongoing_requests: int = Field(default=512, ge=1)
    engine_max_ongoing_requests: int = Field(default=512, ge=1)
    region_resources: bool = False  # place each region's engines with `ray_resource`
    inject_rtt: bool = True  # sleep the configured RTT on the simulated network path
    retry_attempts: int = Field(default=3, ge=1)  # replicas tried before the first token
    stream_interval_ms: float = Field(default=5.0, ge=0)  # engine -> ingress: later chunks coalesce this long
    max_request_bytes: int = Field(default=16 << 20, ge=1024)  # a larger request body: 413, not read
    cors_allowed_origins: list[str] = Field(default_factory=list)  # browser origins (["*"]: any); none: no CORS


class BudgetsConfig(_Strict):
    ledger_path: str | None = "proxima-ledger.db"  # SQLite (WAL), relative to the cwd; null = memory only
    reservation_ttl_s: float = Field(default=900.0, gt=0)
    ledger_timeout_s: float = Field(default=5.0, gt=0)  # a reservation unanswered this long: 503
    settle_wait_s: float = Field(default=1.0, ge=0)  # a response's end waits this long for its charge


class TierConfig(_Strict):
    model: str
    max_prompt_tokens: int | None = Field(default=None, gt=0)


class DelegationSection(_Strict):
    """Model tiers and the `auto` alias (serving.delegation)."""

    alias: str = "auto"
    tiers: dict[str, TierConfig]
    small: str = "small"
    large: str = "large"
    default: str = "large"
    short_prompt_tokens: int = Field(default=0, ge=0)
    large_for_tools: bool = True
    cascade: bool = False
    slo_ttft_ms: float | None = Field(default=None, gt=0)  # when the request names none


class FailoverSection(_Strict):
    """Circuit breakers (serving.failover.breaker.BreakerConfig)."""

    failures: int = Field(default=2, ge=1)
    recoveries: int = Field(default=2, ge=1)
    cooldown_s: float = Field(default=2.0, ge=0)
    window_s: float = Field(default=5.0, gt=0)
    half_open_after_s: float | None = Field(default=5.0, gt=0)


class ObservabilitySection(_Strict):
    """Agent-step records, metrics merge, logs and traces (serving.observability)."""

    max_sessions: int = Field(default=10_000, ge=1)  # sessions kept (LRU, the biggest tenant's first) for GET /v1/sessions/{id}/steps
    max_steps_per_session: int = Field(default=256, ge=1)  # last N steps kept per session
    metrics_push_s: float = Field(default=2.0, gt=0)  # ingress replica -> fleet metrics merge
    log_format: Literal["json", "text"] = "json"  # Ray replicas' `proxima.*` log lines
    access_log: bool = False  # one JSON line per completion request (proxima.access)
    otlp_endpoint: str | None = None  # OTLP/HTTP traces endpoint; needs the `otel` extra
    service_name: str = "proxima-gateway"
    # GET /metrics: "open" (as vLLM's, for a scraper on a private network) or "admin" (the admin
    # key as a bearer token): its samples carry every tenant's name and usage
    metrics_auth: Literal["open", "admin"] = "open"


class PoolBounds(_Strict):
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=0)


class AutoscalerSection(_Strict):
    """Proxima's autoscaler (serving.autoscaler.policy; docs/autoscaling.md). Needs the app
    deployed with `external_scaler_enabled: true`: it sets replica counts through Serve's
    controller."""

    interval_s: float = Field(default=10.0, gt=0)  # control loop period
    window_s: float = Field(default=60.0, gt=0)  # demand averaged over this
    budget: int | None = Field(default=None, ge=1)  # global replica (GPU) budget
    min_replicas: int = Field(default=1, ge=0)  # per region and model
    max_replicas: int = Field(default=8, ge=0)
    regions: dict[str, PoolBounds] = Field(default_factory=dict)  # per-region overrides
    slo_ttft_ms: float = Field(default=1000.0, gt=0)
    slo_weight: float = Field(default=10.0, ge=0)
    max_utilization: float = Field(default=0.85, gt=0, le=1)
    replica_cost_ms: float = Field(default=1.0, ge=0)
    hysteresis: float = Field(default=0.15, ge=0)
    upscale_cooldown_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0)
    move_delay_s: float = Field(default=60.0, ge=0)
    lead_s: float = Field(default=60.0, ge=0)
    max_down_step: int = Field(default=2, ge=1)
    drain_timeout_s: float = Field(default=30.0, ge=0)  # wait this long for in-flight requests

    def bounds(self, region: str) -> tuple[int, int]:
        b = self.regions.get(region, PoolBounds())
        return (self.min_replicas if b.min_replicas is None else b.min_replicas,
                self.max_replicas if b.max_replicas is None else b.max_replicas)


class Config(_Strict):
    home_region: str
    rtt_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    router: RouterConfig = Field(default_factory=RouterConfig)
    models: list[ModelConfig] = Field(min_length=1)
    regions: dict[str, RegionConfig]
    auth: AuthConfig = Field(default_factory=AuthConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    delegation: DelegationSection | None = None
    failover: FailoverSection = Field(default_factory=FailoverSection)
    observability: ObservabilitySection = Field(default_factory=ObservabilitySection)
    autoscaler: AutoscalerSection | None = None

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise _Keyed("models", f"duplicate model names {names}")
        if not self.regions:
            raise _Keyed("regions", "at least one region is required")
        if self.home_region not in self.regions:
            raise _Keyed("home_region", f"{self.home_region!r} is not under regions {sorted(self.regions)}")
        if self.observability.metrics_auth == "admin" and self.auth.admin_key_sha256 is None:
            raise _Keyed("observability.metrics_auth", "`admin` needs auth.admin_key_sha256")
        for reg in (self.autoscaler.regions if self.autoscaler else {}):
            if reg not in self.regions:
                raise _Keyed(f"autoscaler.regions.{reg}", "unknown region (not under regions)")
        if self.autoscaler is not None:  # bounds the policy would silently clip or overrun
            a, floor = self.autoscaler, 0
            for name, r in self.regions.items():
                if r.replicas == 0:  # no engine deployment (a client-only region): nothing to scale
                    continue
                lo, hi = a.bounds(name)
                key = f"autoscaler.regions.{name}" if name in a.regions else "autoscaler"
                if lo > hi:
                    raise _Keyed(key, f"min_replicas {lo} is above max_replicas {hi}")
                if not lo <= r.replicas <= hi:
                    raise _Keyed(f"regions.{name}.replicas", f"{r.replicas} is outside the autoscaler's "
                                                            f"bounds [{lo}, {hi}]")
                floor += lo * len(self.region_models(name))
            if a.budget is not None and a.budget < floor:
                raise _Keyed("autoscaler.budget", f"{a.budget} is below the sum of min_replicas ({floor})")
            start = sum(r.replicas * len(self.region_models(n)) for n, r in self.regions.items())
            if a.budget is not None and start > a.budget:
                raise _Keyed("autoscaler.budget", f"{a.budget} is below the replicas deployed at start ({start})")
        for client, row in self.rtt_ms.items():
            if client not in self.regions:
                raise _Keyed(f"rtt_ms.{client}", "unknown region (not under regions)")
            for server, v in row.items():
                if server not in self.regions:
                    raise _Keyed(f"rtt_ms.{client}.{server}", "unknown region (not under regions)")
                if v < 0:
                    raise _Keyed(f"rtt_ms.{client}.{server}", "must be >= 0")
        if self.rtt_ms:  # a partial matrix would read a missing pair as 0 ms: the nearest region
            given = {(c, s) for c, row in self.rtt_ms.items() for s in row}
            for c in self.regions:
                for s in self.regions:
                    if c != s and (c, s) not in given and (s, c) not in given:
                        raise _Keyed(f"rtt_ms.{c}.{s}", "missing: give every pair of regions (one way is "
                                                        "mirrored), or no rtt_ms at all (every pair 0 ms)")
        for name, r in self.regions.items():
            for m in r.models or ():
                if m not in names:
                    raise _Keyed(f"regions.{name}.models", f"unknown model {m!r}; configured: {names}")
            try:
                check_options(r.engine.kind, r.engine.options, self.region_models(name))
            except ValueError as e:
                raise _Keyed(f"regions.{name}.engine.options", str(e)) from None
            for m in r.per_model:
                if m not in self.region_models(name):
                    raise _Keyed(f"regions.{name}.per_model.{m}", f"model not served in this region; "
                                                                   f"served: {self.region_models(name)}")
            if self.serve.region_resources and not r.ray_resource:
                raise _Keyed(f"regions.{name}.ray_resource", "required when serve.region_resources is true")
        sizes = {PROFILES[r.profile].block_size for r in self.regions.values()}
        if len(sizes) > 1:
            raise _Keyed("regions", f"profiles mix KV block sizes {sorted(sizes)}; use one block size")
        for t, tc in self.auth.tenants.items():
            for reg in tc.allowed_regions or ():
                if reg not in self.regions:
                    raise _Keyed(f"auth.tenants.{t}.allowed_regions", f"unknown region {reg!r}")
        d = self.delegation
        if d is not None:
            for key in ("small", "large", "default"):
                if getattr(d, key) not in d.tiers:
                    raise _Keyed(f"delegation.{key}", f"{getattr(d, key)!r} is not one of the tiers "
                                                      f"{sorted(d.tiers)}")
            for t, tc in d.tiers.items():
                if tc.model not in names:
                    raise _Keyed(f"delegation.tiers.{t}.model", f"unknown model {tc.model!r}; "
                                                                f"configured: {names}")
            if d.alias in names:
                raise _Keyed("delegation.alias", f"{d.alias!r} is also a model name")
        return self

    # --- derived views ------------------------------------------------------
    def rtt(self) -> dict[str, dict[str, float]]:
        """The full matrix: given entries, mirrored where only one side is given, else 0."""
        out = {c: {s: 0.0 for s in self.regions} for c in self.regions}
        for c, row in self.rtt_ms.items():
            for s, v in row.items():
                out[c][s] = float(v)
                if s not in self.rtt_ms or c not in self.rtt_ms[s]:
                    out[s][c] = float(v)
        return out

    def region_models(self, region: str) -> list[str]:
        r = self.regions[region]
        return list(r.models) if r.models is not None else [m.name for m in self.models]

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def max_model_len(self, name: str) -> int:
        """The context limit requests are checked against: the tightest replica serving it."""
        m = self.model(name)
        limits = [min(PROFILES[r.profile].max_model_len, r.kv_capacity_tokens)
                  for reg, r in self.regions.items() if name in self.region_models(reg) and r.replicas]
        limit = min(limits) if limits else 0
        return min(limit, m.max_model_len) if m and m.max_model_len else limit

    @property
    def block_size(self) -> int:
        return PROFILES[next(iter(self.regions.values())).profile].block_size


class _Keyed(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")


def load_config(source: str | Path | dict[str, Any]) -> Config:
    """Parse a YAML file (path) or an already-loaded dict; raise ConfigError naming the key."""
    if isinstance(source, dict):
        raw = source
    else:
        try:
            raw = yaml.safe_load(Path(source).read_text())
        except OSError as e:
            raise ConfigError(f"config: cannot read {source}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    key = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    if not key:  # a model_validator's error already starts with its key
        return msg
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{key}: {msg}{more}"
