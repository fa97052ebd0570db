"""The simulator's command line.

    python -m serving.sim run SCENARIO.yaml --out DIR [--policy NAME ...] [--autoscaler NAME ...] [--no-plots]
    python -m serving.sim SCENARIO.yaml ...              (same as `run`)
    python -m serving.sim trace SCENARIO.yaml --out trace.jsonl

`run` simulates every policy (or those named) on the identical arrivals,
prints progress to stderr and the results JSON to stdout, and with --out
writes DIR/results.json plus PNG plots when matplotlib is installed.
`trace` writes the scenario's arrivals as a Mooncake JSONL trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from serving.sim.loop import run_policies
from serving.sim.scenario import PolicySpec, ScenarioError, load
from serving.sim.tracegen import write_trace
from serving.sim.workload import arrivals


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "trace", "-h", "--help"):
        argv.insert(0, "run")
    ap = argparse.ArgumentParser(prog="python -m serving.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="simulate policies side by side")
    r.add_argument("scenario")
    r.add_argument("--out", help="directory for results.json and plots")
    r.add_argument("--policy", action="append", help="a policy name (repeatable); default: the scenario's")
    r.add_argument("--autoscaler", action="append",
                   help="an autoscaler from the scenario's autoscaling.compare (repeatable); default: all")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    t = sub.add_parser("trace", help="write the scenario's arrivals as Mooncake JSONL")
    t.add_argument("scenario")
    t.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        sc = load(args.scenario)
        if args.cmd == "trace":
            n = write_trace(sc, Path(args.out))
            print(json.dumps({"trace": args.out, "requests": n}))
            return 0
        specs = None
        if args.policy:
            by_label = {p.label: p for p in sc.policies}
            specs = [by_label.get(name) or PolicySpec(name, name) for name in args.policy]
            from serving.sim.scenario import _policies
            _policies([s.policy for s in specs])  # validates the names
        if args.autoscaler:
            known = {v.name: v for v in (sc.autoscaling.variants if sc.autoscaling else ())}
            for name in args.autoscaler:
                if name not in known:
                    raise ScenarioError(f"--autoscaler {name}: not in autoscaling.compare {sorted(known)}")
            sc = replace(sc, autoscaling=replace(sc.autoscaling,
                                                 variants=tuple(known[n] for n in args.autoscaler)))
        out = Path(args.out) if args.out else None
        if out is not None:  # before the run: an unwritable directory must not cost a whole run
            try:
                out.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=out).close()  # writable, and nothing left behind
            except OSError as e:
                raise ScenarioError(f"--out {args.out}: cannot write there ({e.strerror})") from None
        if next(iter(arrivals(sc)), None) is None:
            raise ScenarioError(f"workload: no request arrives in [0, duration_s) ({sc.duration_s:g} s): "
                                "check the rates, the traces and their start_s/end_s")
        t0 = time.perf_counter()
        res = run_policies(sc, specs, progress=not args.quiet)  # a trace is read as it is replayed
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    series = res.pop("_series")
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(res, indent=2)
    print(text)
    if out is not None:
        (out / "results.json").write_text(text + "\n")
        if not args.no_plots:
            from serving.sim.plots import plot
            made = plot(series, out)
            if not args.quiet:
                print(f"plots: {', '.join(made) if made else 'skipped (pip install matplotlib)'}",
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
