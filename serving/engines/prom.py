"""A small reader for the Prometheus text format, for vLLM's `/metrics`.

Only the samples we ask for are kept, summed over label sets (a server may
report one series per engine core), so parsing a large page stays cheap. Label
values are returned for info-style gauges such as `vllm:cache_config_info`.
"""

from __future__ import annotations

import re

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str, names: frozenset[str]) -> tuple[dict[str, float], dict[str, dict[str, str]]]:
    """Sum of each wanted sample name's values, and the labels of its last series."""
    values: dict[str, float] = {}
    labels: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if space < 0:
            continue
        end = brace if 0 <= brace < space else space
        name = line[:end]
        if name not in names:
            continue
        if end == brace:
            close = line.rfind("}")
            labels[name] = dict(_LABEL.findall(line[brace + 1:close]))
            rest = line[close + 1:].split()
        else:
            rest = line[space + 1:].split()
        try:
            values[name] = values.get(name, 0.0) + float(rest[0])
        except (IndexError, ValueError):
            continue
    return values, labels
