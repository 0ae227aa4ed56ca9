"""Latency percentiles against output throughput across a sweep, one line per method (PNG)."""
from __future__ import annotations

from pathlib import Path

_PANELS = (("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"), ("itl", "ITL (ms)"), ("e2el", "E2E latency (ms)"))
_STATS = (("median", "-"), ("p99", "--"))


def plot_sweep(results, path: str | Path) -> None:
    """results: PointResults of bench.serving (method, point, metrics), in sweep order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in results))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, _PANELS):
        for color_index, method in enumerate(methods):
            points = [r for r in results if r.method == method]
            xs = [r.metrics.output_throughput for r in points]
            for stat, style in _STATS:
                ys = [getattr(getattr(r.metrics, key), stat) for r in points]
                pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if not pairs:
                    continue
                ax.plot(*zip(*pairs), style, marker="o", color=f"C{color_index}", label=f"{method} {stat}")
            for r, x in zip(points, xs):
                y = getattr(getattr(r.metrics, key), "median")
                if y is not None:
                    ax.annotate(r.point.label, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_title(title)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 8)), fontsize=8)
    fig.suptitle("berth bench: latency vs throughput")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
