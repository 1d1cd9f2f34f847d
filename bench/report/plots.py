"""Plots for sweeps: accuracy against visual tokens per image (the Pareto view), seed spread as error bars."""

from __future__ import annotations

from pathlib import Path

from bench.report.charts import colour
from bench.report.tables import aggregate, load_runs

#: what to install for the plots (tables need nothing extra)
PLOTS_NEED = "plots need matplotlib: pip install 'connector-zoo[report]'"


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def pareto_plots(run_paths, out: Path) -> list[Path]:
    """Test accuracy against visual tokens per image and against prefill latency, seed spread as error bars."""
    rows = aggregate(load_runs(run_paths))
    blind = [r for r in rows if r["name"].startswith("blind") and "test" in r]
    paths = []
    for x_key, label, name in (
        ("tokens", "visual tokens per image (log scale)", "accuracy_vs_tokens"),
        ("prefill_ms", "prefill latency at batch 1, ms (log scale)", "accuracy_vs_latency"),
    ):
        points = [r for r in rows if x_key in r and "test" in r and not r["name"].startswith("blind")]
        if points:
            paths += scatter(points, blind, x_key, label, out / name)
    return paths


def scatter(points, blind, x_key: str, xlabel: str, stem: Path) -> list[Path]:
    return save(scatter_figure(points, blind, x_key, xlabel), stem)


def scatter_figure(points, blind, x_key: str, xlabel: str, front: bool = False):
    """Test accuracy against ``x_key`` (log scale), seed spread as error bars; ``front`` draws the Pareto front
    (configurations no other beats on both axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)

    for k, r in enumerate(points):
        (x, dx), (y, dy) = r[x_key], r["test"]
        ax.errorbar(
            x,
            100 * y,
            xerr=dx or None,
            yerr=100 * dy,
            fmt="osD^vP*X<>"[k % 10],
            capsize=3,
            label=r["name"],
            color=colour(plt, k, len(points)),
        )
    for r in blind:
        ax.axhline(100 * r["test"][0], color="grey", linestyle="--", linewidth=1, label=r["name"])
    if front:
        on = pareto_front([(r[x_key][0], r["test"][0]) for r in points])
        xy = sorted((points[i][x_key][0], 100 * points[i]["test"][0]) for i in on)
        ax.step(
            [x for x, _ in xy],
            [y for _, y in xy],
            where="post",
            color="black",
            alpha=0.4,
            linewidth=1,
            label="Pareto front",
        )
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (exact match, %)")
    ax.set_title("Accuracy against " + xlabel.split(" (")[0].split(",")[0])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) that no other point dominates (cost <= and accuracy >=, one strictly)."""
    return [
        i for i, (x, y) in enumerate(points) if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)
    ]


def save(fig, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    paths = [stem.with_suffix(f".{ext}") for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path)
    plt.close(fig)
    return paths


def pruning_plot(rows, stem: Path) -> list[Path]:
    return save(pruning_figure(rows), stem)


def pruning_figure(rows):
    """Accuracy against the share of visual tokens kept, per reducer (random_keep with its spread over draws), and
    cls_prune's measured prefill speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    styles = {
        "cls_prune": ("o-", "CLS-attention pruning (FasterVLM)"),
        "random_keep": ("^--", "random keep"),
        "avgpool": ("s-.", "average pooling"),
        "visionzip": ("D-", "VisionZip (dominant + contextual)"),
        "prumerge": ("v:", "PruMerge (fixed ratio)"),
        "fastv": ("P-", "FastV (in the LLM, after layer 1)"),
    }
    for method, (style, label) in styles.items():
        points = [r for r in rows if r.get("method", "cls_prune") == method]
        if not points:
            continue
        keep = [100 * r["keep_ratio"] for r in points]
        acc = [100 * r["accuracy"] for r in points]
        draws = points[0].get("draws", 1)
        ax.errorbar(
            keep,
            acc,
            yerr=[100 * r.get("accuracy_std", 0.0) for r in points],
            fmt=style,
            capsize=3,
            label=label + (f" ({draws} draws)" if draws > 1 else ""),
        )
    ax.axhline(100 * rows[0]["unpruned_accuracy"], color="grey", linestyle="--", label="unpruned")
    ax.set_xlabel("visual tokens kept (%)")
    ax.set_ylabel("test accuracy (exact match, %)")
    ax.invert_xaxis()
    timed = [r for r in rows if "speedup" in r]
    handles, labels = ax.get_legend_handles_labels()
    if timed:
        ax2 = ax.twinx()
        ax2.plot(
            [100 * r["keep_ratio"] for r in timed],
            [r["speedup"] for r in timed],
            ":",
            color="tab:grey",
            label="cls_prune prefill speed-up",
        )
        ax2.set_ylabel("prefill speed-up (x)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.set_title("Training-free token reduction in front of a trained projector")
    ax.legend(handles, labels, fontsize=7)
    ax.grid(True, alpha=0.3)
    return fig
