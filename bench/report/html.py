"""``bench report RUNS... --html DIR``: one self-contained static page (``DIR/index.html``: no server, no network, every
figure and image inlined) built with Jinja2 from the same rows as the Markdown table.

The page holds the ablation table (sortable, mean ± std, the blind row, best per column marked, each configuration
against the best), accuracy against visual tokens and against prefill latency with the Pareto front, per-question-type
bars, training loss per stage, the pruning curve of any ``pruning_curve.json`` under the given directories, for the
mini world the error breakdown by object size and by number of objects, and a gallery: the same questions with each
configuration's answer next to the truth, wrong answers marked, filterable by question type. Rebuilding from the same
runs gives the same bytes.
"""

from __future__ import annotations

import base64
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.evaluate.accuracy import strip_image
from bench.report import charts
from bench.report.breakdown import SIZE_BUCKETS, breakdown, question_facts
from bench.report.builds import legend_note
from bench.report.plots import pareto_front, pruning_figure, scatter_figure
from bench.report.tables import (
    BUILD,
    VS_BEST,
    aggregate,
    all_columns,
    best,
    builds_of,
    column_info,
    fmt,
    load_runs,
    missing_cell,
    run_name,
    vs_best_text,
)
from bench.train.assemble import load_data
from bench.train.settings import RunConfig
from connector_zoo.io import atomic_path


def table_context(rows: list[dict[str, Any]], builds_note: str = "") -> dict[str, Any]:
    cols = all_columns(rows)
    top = best(rows)
    with_std = any(len(r["seeds"]) > 1 for r in rows)
    with_builds = any("build" in r for r in rows)
    header = [{"label": "configuration", "numeric": False}, {"label": "seeds", "numeric": True}]
    header += [{"label": BUILD, "numeric": False}] if with_builds else []
    header += [{"label": column_info(c)[0], "numeric": True, "higher": column_info(c)[1]} for c in cols]
    with_pairs = any("vs_best" in r for r in rows)
    if with_pairs:
        header.append({"label": VS_BEST, "numeric": True})
    body = []
    for r in rows:
        blind = r["name"].startswith("blind")
        cells = [
            {"text": r["name"], "sort": r["name"], "best": False},
            {"text": str(len(r["seeds"])), "sort": len(r["seeds"]), "best": False},
        ]
        if with_builds:
            cells.append({"text": r.get("build", ""), "sort": r.get("build", ""), "best": False})
        for c in cols:
            if c not in r:
                cells.append({"text": missing_cell(r, c), "sort": "", "best": False})
                continue
            marked = not blind and abs(r[c][0] - top.get(c, float("nan"))) < 1e-12
            cells.append({"text": fmt(c, *r[c], with_std), "sort": f"{r[c][0]:.9g}", "best": marked})
        if with_pairs:
            pair = r.get("vs_best")
            sort = 0 if pair == "best" else "" if pair is None else f"{pair['diff']:.9g}"
            cells.append({"text": vs_best_text(pair), "sort": sort, "best": pair == "best"})
        body.append({"blind": blind, "cells": cells})
    return {"header": header, "rows": body, "with_std": with_std, "builds_note": builds_note}


def eval_split(runs: list[dict[str, Any]]) -> str | None:
    """The split whose per-question answers the gallery shows: ``test`` when recorded, else the first one."""
    splits = [s for r in runs for s, m in r["metrics"].items() if "per_question" in m.get("accuracy", {})]
    return "test" if "test" in splits else (splits[0] if splits else None)


def png_uri(image, max_side: int = 224) -> str:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def lowest_seed_answers(runs: list[dict[str, Any]], split: str) -> dict[str, dict[str, tuple[str | None, int]]]:
    """{configuration: {question id: (answer or None, 0/1)}} from each configuration's lowest seed."""
    chosen: dict[str, dict[str, Any]] = {}
    for r in runs:
        name = run_name(r)
        if "per_question" in r["metrics"].get(split, {}).get("accuracy", {}) and (
            name not in chosen or r["config"]["seed"] < chosen[name]["config"]["seed"]
        ):
            chosen[name] = r
    out = {}
    for name, r in sorted(chosen.items()):
        pq = r["metrics"][split]["accuracy"]["per_question"]
        answers = pq.get("answers") or [None] * len(pq["ids"])
        out[name] = {qid: (a, c) for qid, a, c in zip(pq["ids"], answers, pq["correct"])}
    return out


def pick_questions(answers: dict[str, dict[str, tuple]], types: dict[str, str], per_type: int) -> list[str]:
    """Up to ``per_type`` questions of each type answered by every configuration: those the configurations disagree
    on most first (min of right and wrong counts), then by id."""
    common = set.intersection(*(set(a) for a in answers.values())) if answers else set()
    by_type: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for qid in common:
        right = sum(a[qid][1] for a in answers.values())
        by_type[types.get(qid, "all")].append((-min(right, len(answers) - right), qid))
    return [qid for t in sorted(by_type) for _, qid in sorted(by_type[t])[:per_type]]


def gallery(runs: list[dict[str, Any]], per_type: int, log=print) -> tuple[dict[str, Any] | None, Any, str]:
    """(the gallery's context, the world or None, a note when the gallery could not be built)."""

    split = eval_split(runs)
    if split is None:
        return None, None, "no run recorded per-question answers (results.json from before December 2026)"
    first = min(runs, key=lambda r: (run_name(r), r["config"]["seed"]))
    try:
        cfg = RunConfig(**{k: v for k, v in first["config"].items() if k in RunConfig.__dataclass_fields__})
        _, _, evals, world = load_data(cfg, log=lambda m: None)
    except (OSError, ValueError, TypeError) as err:  # e.g. a LLaVA image folder that is not on this machine
        return None, None, f"the gallery's images could not be loaded: {err}"
    data = evals.get(split) or next(iter(evals.values()))
    samples = {s.id: s for s in data.samples}
    answers = lowest_seed_answers(runs, split)
    types = {qid: s.meta.get("type", "all") for qid, s in samples.items()}
    items = []
    for qid in pick_questions(
        {n: {q: v for q, v in a.items() if q in samples} for n, a in answers.items()}, types, per_type
    ):
        s = samples[qid]
        image = None
        try:
            image = png_uri(data.images.load(s.image)) if s.image is not None else None
        except Exception as err:  # noqa: BLE001 (one unreadable image must not lose the page)
            log(f"gallery: {qid}: image not shown ({err})")
        question = strip_image(s.messages[-2:-1])[0]["content"]
        items.append(
            {
                "id": qid,
                "type": types[qid],
                "question": question,
                "truth": s.messages[-1]["content"],
                "image": image,
                "answers": [{"name": n, "text": a[qid][0], "correct": bool(a[qid][1])} for n, a in answers.items()],
            }
        )
    return {"split": split, "types": sorted({i["type"] for i in items}), "items": items}, world, ""


def pruning_curves(paths: list[str | Path]) -> list[dict[str, Any]]:
    found = []
    for p in map(Path, paths):
        files = [p] if p.name == "pruning_curve.json" else sorted(p.rglob("pruning_curve.json")) if p.is_dir() else []
        for f in files:
            rows = json.loads(f.read_text())
            if rows:
                found.append({"source": str(f), "uri": charts.data_uri(pruning_figure(rows))})
    return found


def breakdown_context(runs, world, log=print) -> dict[str, Any] | None:
    if world is None:
        return None
    try:
        facts = question_facts(world, "test")
    except ValueError as err:  # a world whose questions this version does not parse: the page goes on without it
        log(f"error breakdown left out: {err}")
        return None
    bd = breakdown(runs, facts, run_name)
    if not bd:
        return None
    objects = sorted({k for v in bd.values() for k in v["objects"]})
    sizes = [b for b in SIZE_BUCKETS if any(b in v["size"] for v in bd.values())]
    cell = lambda v: "" if v is None else f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"  # noqa: E731
    rows = [
        {
            "name": n,
            "size": [cell(v["size"].get(b)) for b in sizes],
            "objects": [cell(v["objects"].get(k)) for k in objects],
        }
        for n, v in sorted(bd.items())
    ]
    any_cfg = next(iter(bd.values()))
    counts = {
        "size": [any_cfg["size"].get(b, (0, 0, 0))[2] for b in sizes],
        "objects": [any_cfg["objects"].get(k, (0, 0, 0))[2] for k in objects],
    }
    return {
        "sizes": sizes,
        "objects": objects,
        "rows": rows,
        "counts": counts,
        "uri": charts.data_uri(charts.breakdown_bars(bd)),
    }


def figures(rows, runs) -> list[dict[str, str]]:
    out = []
    blind = [r for r in rows if r["name"].startswith("blind") and "test" in r]
    for x_key, label, title in (
        ("tokens", "visual tokens per image (log scale)", "Accuracy against visual tokens"),
        ("prefill_ms", "prefill latency at batch 1, ms (log scale)", "Accuracy against prefill latency"),
    ):
        points = [r for r in rows if x_key in r and "test" in r and not r["name"].startswith("blind")]
        if points:
            front = [points[i]["name"] for i in pareto_front([(r[x_key][0], r["test"][0]) for r in points])]
            out.append(
                {
                    "id": f"pareto-{x_key}",
                    "title": title,
                    "note": "Pareto front: " + ", ".join(front),
                    "uri": charts.data_uri(scatter_figure(points, blind, x_key, label, front=True)),
                }
            )
    if any(t in r for r in rows for t in ("colour", "shape", "count")):
        out.append(
            {
                "id": "types",
                "title": "Accuracy by question type",
                "note": "",
                "uri": charts.data_uri(charts.type_bars(rows)),
            }
        )
    curves = charts.mean_curves(runs)
    if curves:
        note = "mean over seeds (faint), its moving average over 2 % of the steps, band ± std over seeds"
        out.append(
            {
                "id": "loss",
                "title": "Training loss per stage",
                "note": note,
                "uri": charts.data_uri(charts.loss_curves(curves)),
            }
        )
    return out


def write_html(run_paths: list[str | Path], out_dir: Path, per_type: int = 4, log=print) -> Path:
    """Render the page into ``out_dir/index.html`` (written atomically) and return its path."""
    import jinja2

    runs = load_runs(run_paths)
    builds = builds_of(runs)
    rows = aggregate(runs, builds)
    gal, world, gallery_note = gallery(runs, per_type, log)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bench.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = charts.short
    commits = sorted({(r.get("git_commit") or "unknown")[:10] for r in runs})
    page = env.get_template("report.html.j2").render(
        runs=len(runs),
        configs=sum(not r["name"].startswith("blind") for r in rows),
        commits=commits,
        table=table_context(rows, legend_note(builds)),
        figures=figures(rows, runs),
        pruning=pruning_curves(run_paths),
        breakdown=breakdown_context(runs, world, log),
        gallery=gal,
        gallery_note=gallery_note,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
