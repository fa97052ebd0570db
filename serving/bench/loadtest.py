"""Load-test summary: locust's --csv output -> percentiles and SLO pass/fail per user class.

    python -m serving.bench.loadtest loadtests/out/run [--slo loadtests/slo.yaml]

Reads `<prefix>_stats.csv` (locust --csv <prefix>). Each user class of
loadtests/locustfile.py reports under its own name: its requests (response
time = the whole call, to the last byte of the stream) and, for streamed
classes, a "TTFT" row (time to the first content token). Writes
`<prefix>_summary.json` and `<prefix>_summary.txt` and prints the text:

    class   reqs  fails  ttft p50/p90/p99 ms  e2e p50/p90/p99 ms  req/s  SLO

SLOs (loadtests/slo.yaml), per class: `<ttft|e2e>_p<50|90|95|99>_ms` upper
bounds and `max_failure_rate`. A class with no requests in the run is
reported as "skipped", not failed. Exit status 1 when any SLO fails (or the
run made no requests at all), so `make loadtest` fails with it.

Locust stores response times in buckets (exact below 100 ms, two significant
digits above), so percentiles are as precise as that.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

_LIMIT = re.compile(r"^(ttft|e2e)_p(50|66|75|80|90|95|98|99)_ms$")
PERCENTILES = ("50", "90", "99")


def read_stats(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(type, name) -> the row's numbers: requests, failures, rps, p50..p99 (ms, None if no data)."""
    out = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                continue
            rec: dict[str, Any] = {"requests": int(row["Request Count"]),
                                   "failures": int(row["Failure Count"]),
                                   "rps": float(row["Requests/s"])}
            for col, val in row.items():
                if col and col.endswith("%") and val not in ("", "N/A"):
                    rec["p" + col[:-1]] = float(val)
            out[(row["Type"], row["Name"])] = rec
    return out


def summarize(stats: dict[tuple[str, str], dict[str, Any]],
              slo: dict[str, dict[str, float]]) -> dict[str, Any]:
    classes: dict[str, Any] = {}
    for (typ, name), rec in stats.items():
        if typ == "TTFT":
            continue
        c = classes.setdefault(name, {"requests": 0, "failures": 0, "rps": 0.0, "e2e_ms": {}, "ttft_ms": {}})
        c["requests"] += rec["requests"]
        c["failures"] += rec["failures"]
        c["rps"] = round(c["rps"] + rec["rps"], 3)
        c["e2e_ms"] = {p: rec.get("p" + p) for p in PERCENTILES}
        c["_e2e_all"] = rec
    for (typ, name), rec in stats.items():
        if typ == "TTFT" and name in classes:
            classes[name]["ttft_ms"] = {p: rec.get("p" + p) for p in PERCENTILES}
            classes[name]["_ttft_all"] = rec
    for name in slo:
        classes.setdefault(name, {"requests": 0, "failures": 0, "rps": 0.0, "e2e_ms": {}, "ttft_ms": {}})
    for name, c in classes.items():
        c["failure_rate"] = round(c["failures"] / c["requests"], 6) if c["requests"] else None
        c["slo"] = check(c, slo.get(name, {}))
        c.pop("_e2e_all", None), c.pop("_ttft_all", None)
    verdicts = [c["slo"]["verdict"] for c in classes.values()]
    total = sum(c["requests"] for c in classes.values())
    ok = total > 0 and "fail" not in verdicts
    return {"passed": ok, "requests": total, "failures": sum(c["failures"] for c in classes.values()),
            "classes": dict(sorted(classes.items()))}


def check(c: dict[str, Any], limits: dict[str, float]) -> dict[str, Any]:
    """Each limit: {limit, actual, ok}; verdict pass | fail | skipped (no requests)."""
    if not c["requests"]:
        return {"verdict": "skipped", "checks": {}}
    checks = {}
    for key, limit in limits.items():
        if key == "max_failure_rate":
            actual = c["failure_rate"]
        else:
            m = _LIMIT.match(key)
            if m is None:
                raise ValueError(f"slo: unknown key {key!r} (want max_failure_rate or ttft|e2e_pNN_ms)")
            rec = c.get("_ttft_all" if m[1] == "ttft" else "_e2e_all") or {}
            actual = rec.get("p" + m[2])
        ok = actual is not None and actual <= limit
        checks[key] = {"limit": limit, "actual": actual, "ok": ok}
    return {"verdict": "pass" if all(v["ok"] for v in checks.values()) else "fail", "checks": checks}


def render(s: dict[str, Any]) -> str:
    def trio(d: dict) -> str:
        return "/".join("-" if d.get(p) is None else f"{d[p]:g}" for p in PERCENTILES) if d else "-"

    lines = [f"{'class':<8} {'reqs':>6} {'fails':>5} {'ttft p50/p90/p99 ms':>20} "
             f"{'e2e p50/p90/p99 ms':>20} {'req/s':>7}  SLO"]
    for name, c in s["classes"].items():
        failed = [k for k, v in c["slo"]["checks"].items() if not v["ok"]]
        verdict = c["slo"]["verdict"] + (f" ({', '.join(failed)})" if failed else "")
        lines.append(f"{name:<8} {c['requests']:>6} {c['failures']:>5} {trio(c['ttft_ms']):>20} "
                     f"{trio(c['e2e_ms']):>20} {c['rps']:>7.2f}  {verdict}")
    lines.append(f"overall: {'PASS' if s['passed'] else 'FAIL'} "
                 f"({s['requests']} requests, {s['failures']} failed)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prefix", help="locust's --csv prefix (reads <prefix>_stats.csv)")
    ap.add_argument("--slo", default="loadtests/slo.yaml")
    a = ap.parse_args(argv)
    slo = yaml.safe_load(Path(a.slo).read_text()) or {}
    s = summarize(read_stats(Path(a.prefix + "_stats.csv")), slo)
    s["slo_file"] = a.slo
    Path(a.prefix + "_summary.json").write_text(json.dumps(s, indent=2) + "\n")
    text = render(s)
    Path(a.prefix + "_summary.txt").write_text(text + "\n")
    print(text)
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
