"""The autoscalers of a scenario side by side, one process per autoscaler.

    python -m serving.bench.autoscaling [SCENARIO] [--out DIR] [--jobs N]

Runs every entry of the scenario's `autoscaling.compare` (default scenario:
loadtests/scenarios/follow-the-sun.yaml) on the identical arrivals (the
stream is a pure function of the seed), each in its own process, so the
comparison takes the time of the slowest run rather than the sum. Prints one
JSON object: per autoscaler the simulator's summary (TTFT percentiles,
goodput = SLO attainment, replica-hours, ...) plus `comparison`, the ratios
the follow-the-sun check asks for; with --out writes results.json and the
plots, replicas_over_time.png among them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from serving.sim.loop import run_policies
from serving.sim.scenario import load

DEFAULT = Path(__file__).resolve().parents[2] / "loadtests" / "scenarios" / "follow-the-sun.yaml"


def _one(path: str, name: str) -> tuple[dict, dict]:
    sc = load(path)
    sc = replace(sc, autoscaling=replace(sc.autoscaling, variants=tuple(
        v for v in sc.autoscaling.variants if v.name == name)))
    t0 = time.perf_counter()
    res = run_policies(sc, [sc.policies[0]])
    series = res.pop("_series")
    for r in res["policies"].values():
        r["wall_s"] = round(time.perf_counter() - t0, 1)
    return res["policies"], series


def comparison(res: dict) -> dict:
    """Each autoscaler against the static split: p99 ratio, replica-hours saved, SLO attainment."""
    base = res.get("static")
    if base is None:
        return {}
    out = {}
    for name, r in res.items():
        if name == "static":
            continue
        out[name] = {
            "ttft_p99_static_over_this": round(base["ttft_p99_ms"] / max(1e-9, r["ttft_p99_ms"]), 3),
            "replica_hours_saved_vs_static": round(1 - r["replica_hours"] / base["replica_hours"], 3),
            "goodput_minus_static": round(r["goodput"] - base["goodput"], 4),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.bench.autoscaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", nargs="?", default=str(DEFAULT))
    ap.add_argument("--out")
    ap.add_argument("--jobs", type=int, default=0, help="processes (default: one per autoscaler)")
    args = ap.parse_args(argv)
    sc = load(args.scenario)
    if sc.autoscaling is None:
        print("error: the scenario has no autoscaling section", file=sys.stderr)
        return 2
    names = [v.name for v in sc.autoscaling.variants]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs or len(names)) as pool:
        done = list(pool.map(_one, [args.scenario] * len(names), names))
    res = {k: v for r, _ in done for k, v in r.items()}
    series = {k: v for _, s in done for k, v in s.items()}
    out = {"scenario": sc.name, "autoscalers": res, "comparison": comparison(res),
           "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(text + "\n")
        from serving.sim.plots import plot
        made = plot(series, d)
        print(f"plots: {', '.join(str(d / m) for m in made) if made else 'skipped (no matplotlib)'}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
