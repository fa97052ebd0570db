"""Check a Grafana dashboard against what a gateway really exports.

    python -m serving.observability.dashboard infra/grafana/proxima-dashboard.json \
        http://127.0.0.1:8000/metrics        # or a saved exposition file

With `observability.metrics_auth: admin`, set PROXIMA_ADMIN_KEY to the admin key.

Prints JSON: every panel query's metric names, and the ones the gateway does
not export (exit 1 if any, or if a panel has no query). A dashboard that
silently shows "No data" after a metric was renamed is what this catches.

metric_names(expr) is a deliberately small PromQL reader: it drops strings,
label matchers, range selectors and by/on/ignoring/group_* label lists, then
keeps identifiers that are not functions, aggregations or keywords.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from typing import Any, Iterator

from prometheus_client.parser import text_string_to_metric_families

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                       "or", "unless", "offset", "inf", "nan", "Inf", "NaN"})
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
             "summary": ("", "_count", "_sum"), "gauge": ("",), "untyped": ("",), "info": ("_info",)}


def metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][-+]?\d+)?", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0) in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            yield from walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    yield p.get("title", ""), t["expr"]
    yield from walk(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", q or "")
        if m:
            yield f"variable ${v.get('name')}", m.group(1)


def exported_names(exposition: str) -> set[str]:
    """Every series name the exposition carries; declared-but-empty families by their type."""
    out: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        if fam.samples:
            out.update(s.name for s in fam.samples)
        else:
            out.update(fam.name + sfx for sfx in _SUFFIXES.get(fam.type, ("",)))
    return out


def check(dashboard: dict[str, Any], exposition: str) -> dict[str, Any]:
    exported = exported_names(exposition)
    panels, missing, empty = [], [], []
    for title, expr in queries(dashboard):
        names = metric_names(expr)
        panels.append({"panel": title, "expr": expr, "metrics": sorted(names)})
        if not names:
            empty.append(title)
        missing += [{"panel": title, "metric": n} for n in sorted(names - exported)]
    for p in dashboard.get("panels", []):
        if p.get("type") != "row" and not any(t.get("expr") for t in p.get("targets", [])):
            empty.append(p.get("title", ""))
    return {"queries": panels, "missing": missing, "without_query": empty,
            "ok": not missing and not empty}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dashboard = json.loads(open(argv[0]).read())
    src = argv[1]
    if src.startswith(("http://", "https://")):
        key = os.environ.get("PROXIMA_ADMIN_KEY")  # observability.metrics_auth: admin
        req = urllib.request.Request(src, headers={"authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as e:
            hint = (" (observability.metrics_auth: admin: set PROXIMA_ADMIN_KEY to the admin key)"
                    if e.code == 401 else "")
            print(f"{src}: HTTP {e.code}{hint}", file=sys.stderr)
            return 2
        except (urllib.error.URLError, OSError) as e:
            print(f"{src}: {getattr(e, 'reason', e)}", file=sys.stderr)
            return 2
    else:
        text = open(src).read()
    res = check(dashboard, text)
    print(json.dumps({"ok": res["ok"], "missing": res["missing"], "without_query": res["without_query"],
                      "queries": len(res["queries"])}, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
