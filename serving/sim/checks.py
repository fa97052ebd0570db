"""Small validators for scenario YAML: each error names the key by its path."""

from __future__ import annotations

from typing import Any


class ScenarioError(ValueError):
    """A scenario file is invalid; the message starts with the offending key."""


def as_mapping(v: Any, k: str) -> dict:
    if not isinstance(v, dict):
        raise ScenarioError(f"{k}: expected a mapping, got {type(v).__name__}")
    return v


def as_list(v: Any, k: str) -> list:
    if not isinstance(v, list):
        raise ScenarioError(f"{k}: expected a list, got {type(v).__name__}")
    return v


def known_keys(d: dict, allowed: set[str], prefix: str) -> None:
    for key in d:
        if key not in allowed:
            raise ScenarioError(f"{prefix}{key}: unknown key; allowed: {sorted(allowed)}")


def number(v: Any, k: str, lo: float | None = None, hi: float | None = None, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScenarioError(f"{k}: expected a number, got {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (strict and v == lo)):
        raise ScenarioError(f"{k}: must be {'>' if strict else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise ScenarioError(f"{k}: must be <= {hi:g}, got {v:g}")
    return v


def integer(v: Any, k: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ScenarioError(f"{k}: expected an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ScenarioError(f"{k}: must be >= {lo}, got {v}")
    return v


def length_knob(v: Any, k: str) -> None:
    """A generator knob: a number, or [lo, hi] for a uniform draw."""
    if isinstance(v, list):
        if len(v) != 2:
            raise ScenarioError(f"{k}: a range is [lo, hi]")
        a, b = (number(x, k, lo=0.0) for x in v)
        if a > b:
            raise ScenarioError(f"{k}: range [lo, hi] needs lo <= hi")
    else:
        number(v, k, lo=0.0)
