"""The HTML report's figures (matplotlib, Agg): per-question-type bars, training loss per stage, the mini world's
error breakdown; each returned as a matplotlib figure, and :func:`data_uri` inlines one as SVG. SVG output is made
deterministic (no date, fixed id salt), so the same runs give the same page byte for byte."""

from __future__ import annotations

import base64
import io
import statistics
from collections import defaultdict
from typing import Any

from bench.report.tables import QUESTION_TYPES, run_name


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "connector-zoo"
    return plt


def data_uri(fig) -> str:
    """The figure as an inline ``data:image/svg+xml;base64,...`` URI (the figure is closed)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def short(name: str) -> str:
    """``clip + mlp2x_gelu + tinyllama (mini)`` -> ``mlp2x_gelu`` when the legend would otherwise be unreadable."""
    parts = name.split(" + ")
    return parts[1] if len(parts) == 3 else name


def colour(plt, k: int, n: int):
    """The k-th of n configurations' colour: tab10 up to 10, else tab20 with its dark shades first (neighbours in a
    legend never get a colour and its lighter twin)."""
    if n <= 10:
        return plt.get_cmap("tab10")(k % 10)
    return plt.get_cmap("tab20")((2 * k) % 20 + (k // 10) % 2)


def type_bars(rows: list[dict[str, Any]]):
    """Test accuracy per question type, one bar per configuration (seed std as error bars), the blind row hatched."""
    plt = pyplot()
    types = [t for t in QUESTION_TYPES if any(t in r for r in rows)]
    shown = [r for r in rows if any(t in r for t in types)]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.16 * len(types) * len(shown) + 2), 4.2), dpi=110)
    width = 0.8 / max(len(shown), 1)
    for k, r in enumerate(shown):
        blind = r["name"].startswith("blind")
        xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(types))]
        ax.bar(
            xs,
            [100 * r[t][0] if t in r else 0 for t in types],
            width,
            yerr=[100 * r[t][1] if t in r else 0 for t in types],
            capsize=1.5,
            error_kw={"linewidth": 0.6},
            color="lightgrey" if blind else colour(plt, k, len(shown)),
            hatch="//" if blind else None,
            edgecolor="grey" if blind else None,
            label="blind" if blind else short(r["name"]),
        )
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy by question type (mean ± std over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, len(shown)), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return fig


def mean_curves(runs: list[dict[str, Any]]) -> dict[str, list[list[tuple[int, float, float]]]]:
    """{configuration: per stage [(step, mean loss, std over seeds)]}, steps present in every seed of the stage."""
    by_config: dict[str, list[list[dict[str, float]]]] = defaultdict(list)
    for r in runs:
        if r.get("loss_history"):
            by_config[run_name(r)].append(r["loss_history"])
    out = {}
    for name, histories in sorted(by_config.items()):
        stages = []
        for s in range(min(len(h) for h in histories)):
            per_seed = [{p["step"]: p["loss"] for p in h[s]} for h in histories]
            steps = sorted(set.intersection(*(set(d) for d in per_seed)))
            values = [[d[step] for d in per_seed] for step in steps]
            stages.append([(step, statistics.fmean(v), statistics.pstdev(v)) for step, v in zip(steps, values)])
        out[name] = stages
    return out


def smooth(values: list[float]) -> list[float]:
    """Trailing moving average over a window of 2 % of the steps (at least 1): the trend of a noisy loss."""
    window = max(1, len(values) // 50)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def loss_curves(curves: dict[str, list[list[tuple[int, float, float]]]]):
    """Training loss against step, one panel per stage, one line per configuration (mean over seeds, band ± std)."""
    plt = pyplot()
    n_stages = max((len(s) for s in curves.values()), default=1)
    fig, axes = plt.subplots(1, n_stages, figsize=(6.5 * n_stages, 4.0), dpi=110, squeeze=False)
    for k, (name, stages) in enumerate(curves.items()):
        c = colour(plt, k, len(curves))
        for s, points in enumerate(stages):
            ax = axes[0][s]
            steps = [p[0] for p in points]
            mean = [p[1] for p in points]
            ax.plot(steps, mean, color=c, linewidth=0.5, alpha=0.35)
            ax.plot(steps, smooth(mean), color=c, linewidth=1.3, label=short(name))
            ax.fill_between(
                steps,
                [m - p[2] for m, p in zip(mean, points)],
                [m + p[2] for m, p in zip(mean, points)],
                color=c,
                alpha=0.15,
                linewidth=0,
            )
    for s, ax in enumerate(axes[0]):
        ax.set_title(f"stage {s + 1}: training loss")
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    return fig


def breakdown_bars(bd: dict[str, dict[str, Any]]):
    """Two panels: accuracy by the size of the object asked about, and by the number of objects in the image."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.0), dpi=110)
    names = sorted(bd)
    for ax, axis, title in (
        (axes[0], "size", "by size of the object asked about"),
        (axes[1], "objects", "by number of objects in the image"),
    ):
        buckets = sorted({b for v in bd.values() for b in v[axis]}, key=str)
        if axis == "size":
            buckets = [b for b in ("small", "large", "mixed", "none") if b in buckets]
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            cells = bd[name][axis]
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(buckets))]
            ax.bar(
                xs,
                [100 * cells[b][0] if b in cells else 0 for b in buckets],
                width,
                yerr=[100 * cells[b][1] if b in cells else 0 for b in buckets],
                capsize=1.5,
                error_kw={"linewidth": 0.6},
                color=colour(plt, k, len(names)),
                label=short(name),
            )
        ax.set_xticks(range(len(buckets)), [str(b) for b in buckets])
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    return fig
