"""PNG plots of a run: TTFT CDF per policy, TTFT by client region, queue depth over time,
and replicas per region over time when autoscalers are compared.

matplotlib is optional (the `dev` extra installs it); without it `plot`
returns an empty list and the JSON results are unaffected.
"""

from __future__ import annotations

from pathlib import Path


def plot(series: dict, out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    made = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, s in series.items():
        x = np.sort(np.asarray(s["ttft_ms"]))
        if x.size:
            ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, client-observed)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF per policy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    made.append(_save(fig, out / "ttft_cdf.png"))

    regions = sorted({r for s in series.values() for r in s["by_client_region"]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(series))
    for k, (label, s) in enumerate(series.items()):
        vals = [s["by_client_region"].get(r, {}).get("ttft_p99_ms", 0.0) for r in regions]
        ax.bar(np.arange(len(regions)) + k * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(regions)) + width * (len(series) - 1) / 2, regions)
    ax.set_ylabel("TTFT p99 (ms)")
    ax.set_title("Latency by client region")
    ax.legend()
    made.append(_save(fig, out / "latency_by_region.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, s in series.items():
        total = np.sum([np.asarray(q) for q in s["queue_depth"].values()], axis=0)
        ax.plot(s["t_s"], total, label=label)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("requests waiting (all replicas)")
    ax.set_title("Queue depth over time")
    ax.legend()
    made.append(_save(fig, out / "queue_depth.png"))

    scaled = {label: s["autoscaler"] for label, s in series.items() if "autoscaler" in s}
    fixed = [label for label, a in scaled.items() if all(len(set(v)) <= 1 for v in a["replicas"].values())]
    for label in fixed[1:]:  # fixed fleets of other sizes: flat lines, one panel shows the shape
        del scaled[label]
    if scaled:
        fig, axes = plt.subplots(len(scaled), 1, figsize=(8, 2.6 * len(scaled)), sharex=True, squeeze=False)
        for ax, (label, a) in zip(axes[:, 0], scaled.items()):
            total = np.sum([np.asarray(v) for v in a["replicas"].values()], axis=0)
            for region, v in a["replicas"].items():
                ax.step(a["t_s"], v, where="post", label=region)
            ax.step(a["t_s"], total, where="post", color="black", linestyle="--", label="total")
            ax.set_title(label)
            ax.set_ylabel("replicas")
            ax.grid(True, alpha=0.3)
        axes[0, 0].legend(loc="upper right", fontsize="small", ncol=4)
        axes[-1, 0].set_xlabel("virtual time (s)")
        made.append(_save(fig, out / "replicas_over_time.png"))
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name
