"""Gateway policies from the config: budgets, delegation, breakers, for `Gateway(...)`.

    gateway_policies(cfg, router_port, ledger=None) -> {"admission", "delegation", "failover"}

`ledger` is the budget ledger to use (the Ray actor's client); without one a
LocalLedger is built here on `budgets.ledger_path` (one process: its event loop
is the single writer). Delegation is on when the config has a `delegation`
section; its load rule asks `router_port.predict` for the large tier's TTFT.
"""

from __future__ import annotations

from typing import Any

from serving.admission.budget import BudgetPolicy
from serving.admission.gateway import BudgetAdmission
from serving.admission.ledger import Ledger
from serving.admission.stage import AsyncLedger, LocalLedger
from serving.config import Config
from serving.delegation.gateway import TierDelegation
from serving.delegation.tiers import DelegationConfig, Tier
from serving.failover.breaker import BreakerConfig, FailoverView
from serving.failover.gateway import CircuitFeed


def budget_policies(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: t.budget.model_dump() for name, t in cfg.auth.tenants.items() if t.budget}


def _policies(cfg: Config) -> dict[str, BudgetPolicy]:
    return {t: BudgetPolicy(**p) for t, p in budget_policies(cfg).items()}


def local_ledger(cfg: Config) -> LocalLedger:
    return LocalLedger(Ledger(_policies(cfg), cfg.budgets.ledger_path,
                              reservation_ttl_s=cfg.budgets.reservation_ttl_s))


def delegation_config(cfg: Config) -> DelegationConfig | None:
    d = cfg.delegation
    if d is None:
        return None
    tiers = []
    for name, t in d.tiers.items():
        m = cfg.model(t.model)
        longest = t.max_prompt_tokens  # what the tier takes: its own limit, within its context (room for a token)
        if m is not None and m.max_model_len:
            longest = min(longest or m.max_model_len, m.max_model_len - 1)
        tiers.append(Tier(name, t.model, m.default_max_tokens if m else 256, longest,
                          reads_tools=m is None or m.tool_parser is not None))
    return DelegationConfig(tuple(tiers), small=d.small, large=d.large, default=d.default, alias=d.alias,
                            short_prompt_tokens=d.short_prompt_tokens,
                            large_for_tools=d.large_for_tools, cascade=d.cascade)


def gateway_policies(cfg: Config, router: Any, ledger: AsyncLedger | None = None,
                     metrics: Any = None) -> dict[str, Any]:
    b = cfg.budgets
    out: dict[str, Any] = {"admission": BudgetAdmission(ledger or local_ledger(cfg), _policies(cfg),
                                                        reserve_timeout_s=b.ledger_timeout_s,
                                                        settle_wait_s=b.settle_wait_s,
                                                        hold_refresh_s=b.reservation_ttl_s / 3)}
    dcfg = delegation_config(cfg)
    if dcfg is not None:
        on_choice = None
        if metrics is not None and hasattr(metrics, "delegation"):
            on_choice = lambda tier, reason: metrics.delegation.labels(tier, reason).inc()  # noqa: E731
        out["delegation"] = TierDelegation(dcfg, router.predict, cfg.delegation.slo_ttft_ms, on_choice)
    f = cfg.failover
    view = FailoverView(BreakerConfig(f.failures, f.recoveries, f.cooldown_s, f.window_s,
                                      f.half_open_after_s))
    out["failover"] = CircuitFeed(view, router.set_circuit)
    return out
