"""Plots for sweeps: accuracy against visual tokens per image (the Pareto view), seed spread as error bars."""

from __future__ import annotations

from pathlib import Path

from bench.report import aggregate, load_runs


def pareto_plots(run_paths, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in aggregate(load_runs(run_paths)) if "tokens" in r and "test" in r]
    blind = [r for r in aggregate(load_runs(run_paths)) if r["name"].startswith("blind") and "test" in r]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        (x, _), (y, dy) = r["tokens"], r["test"]
        ax.errorbar(x, 100 * y, yerr=100 * dy, fmt="o", capsize=3, label=r["name"])
    for r in blind:
        ax.axhline(100 * r["test"][0], color="grey", linestyle="--", linewidth=1, label=r["name"])
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens per image (log scale)")
    ax.set_ylabel("test accuracy (exact match, %)")
    ax.set_title("Accuracy against visual tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = out / f"accuracy_vs_tokens.{ext}"
        fig.savefig(path)
        paths.append(path)
    plt.close(fig)
    return paths
