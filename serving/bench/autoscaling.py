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


def comparison(res: dict, kinds: dict[str, str]) -> dict:
    """Each autoscaler against the static splits, as the follow-the-sun check asks.

    Against `static` (the scenario's own fleet): p99 ratio, replica-hours saved,
    SLO attainment. With static fleets of several sizes in the scenario (kind
    static, `replicas: N`), also *at equal replica-hours*: the static p99 at this
    autoscaler's replica-hours, interpolated linearly between the two static fleets
    around it (null outside their range), over this one's p99; and *at equal SLO
    attainment*: the replica-hours a static fleet needs for this one's goodput,
    likewise interpolated, against this one's (when no static fleet reaches it,
    `..._at_least`: the saving against the static fleet that comes closest).
    """
    static = {n for n in res if kinds.get(n) == "static"}
    statics = [(res[n]["replica_hours"], res[n]["ttft_p99_ms"], res[n]["goodput"]) for n in static]
    # Only fleets better than every smaller one count: a bigger fleet that came out a
    # hair worse (noise) must not make a static split look costlier than it is.
    p99_by_hours = _frontier([(h, p) for h, p, _ in statics], lower=True)
    hours_by_goodput = [(g, h) for h, g in _frontier([(h, g) for h, _, g in statics], lower=False)]
    base = res.get("static")
    out = {}
    for name, r in res.items():
        if name in static:
            continue
        c = {}
        if base is not None:
            c.update({
                "ttft_p99_static_over_this": round(base["ttft_p99_ms"] / max(1e-9, r["ttft_p99_ms"]), 3),
                "replica_hours_saved_vs_static": round(1 - r["replica_hours"] / base["replica_hours"], 3),
                "goodput_minus_static": round(r["goodput"] - base["goodput"], 4),
            })
        if len(statics) >= 2:
            p99 = _interp(r["replica_hours"], p99_by_hours)
            c["ttft_p99_static_over_this_at_equal_replica_hours"] = (
                None if p99 is None else round(p99 / max(1e-9, r["ttft_p99_ms"]), 3))
            hours = _interp(r["goodput"], hours_by_goodput)
            if hours is not None:
                c["replica_hours_saved_at_equal_slo_attainment"] = round(1 - r["replica_hours"] / hours, 3)
            elif r["goodput"] > hours_by_goodput[-1][0]:
                c["replica_hours_saved_at_equal_slo_attainment_at_least"] = round(
                    1 - r["replica_hours"] / hours_by_goodput[-1][1], 3)
        out[name] = c
    return out


def _frontier(pts: list[tuple[float, float]], lower: bool) -> list[tuple[float, float]]:
    """(hours, y) sorted by hours, keeping each point whose y beats every smaller fleet's."""
    out: list[tuple[float, float]] = []
    for h, y in sorted(pts):
        if not out or (y < out[-1][1] if lower else y > out[-1][1]):
            out.append((h, y))
    return out


def _interp(x: float, pts: list[tuple[float, float]]) -> float | None:
    """y at x on the polyline through pts (sorted by x); None outside it."""
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


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
    kinds = {v.name: v.kind for v in sc.autoscaling.variants}
    out = {"scenario": sc.name, "autoscalers": res, "comparison": comparison(res, kinds),
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
