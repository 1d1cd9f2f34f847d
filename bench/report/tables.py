"""``bench report RUN_DIRS...``: ablation tables (Markdown, CSV, LaTeX) from stored ``results.json`` files.

One row per configuration (encoder x connector with its settings x LLM x recipe), mean ± std over seeds, the blind
baseline as its own row, per-question-type accuracy, visual tokens, parameters and training throughput; the best value
of each column is marked. Rows are sorted by name and numbers formatted deterministically, so rebuilding from the same
runs gives the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.evaluate.stats import paired
from bench.report.builds import Builds, backbone_builds, legend_note
from connector_zoo.io import atomic_path

QUESTION_TYPES = ("colour", "shape", "size", "count", "position", "exist", "relation")
# column -> (header, higher is better)
COLUMNS: dict[str, tuple[str, bool]] = {
    "test": ("test acc", True),
    "compositional": ("comp. acc", True),
    **{t: (t, True) for t in QUESTION_TYPES},
    "tokens": ("tokens/img", False),
    "trainable": ("trainable params", False),
    "connector_mflops": ("connector MFLOPs", False),
    "prefill_mflops": ("LLM prefill MFLOPs", False),
    "prefill_ms": ("prefill ms", False),
    "decode_tps": ("decode tok/s", True),
    "samples_per_s": ("train samples/s", True),
}


LMMS = "lmms:"  # lmms-eval columns: "lmms:<task>:<metric>", one per task (its headline metric)


def column_info(col: str) -> tuple[str, bool]:
    """(header, higher is better) of a column; an lmms-eval task's header is the task and its own metric name."""
    if col.startswith(LMMS):
        task, metric = col[len(LMMS) :].split(":", 1)
        return f"{task} {metric}", True
    return COLUMNS[col]


def config_name(cfg: dict[str, Any]) -> str:
    conn = dict(cfg["connector"])
    name = conn.pop("name")
    settings = ",".join(f"{k}={v}" for k, v in sorted(conn.items()))
    conn_label = f"{name}[{settings}]" if settings else name
    return f"{cfg['encoder']['name']} + {conn_label} + {cfg['llm']['name']} ({cfg['recipe']}{tiling_label(cfg)})"


#: the key ``name_runs`` gives each loaded run: its configuration's name in every table of the report
NAME_KEY = "configuration"


def name_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each run its configuration's name (``run[NAME_KEY]``): ``config_name``, and where runs of one such name
    differ in a setting it does not show (``bench.report.cells``: data options such as the world encoder's input
    side, the stages as trained, the evaluation limit, precision ...), each group of them that setting too:
    ``clip + mlp2x_gelu + tinyllama (mini-smollm2; data.pretrain.encoder_px=32)``; the group at the defaults keeps
    the plain name. Two runs of one configuration and one seed are an error: as two seeds of one row, or two answers to
    one paired question, they would count one run twice or drop one silently."""
    from bench.report.cells import differing, distinguishing, trained_stages_in_all, view

    seed_only = ("seed",)  # a row's seeds are its runs

    by_name: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for r in runs:
        groups = by_name[config_name(r["config"])]
        home = next((g for g in groups if not differing(g[0], r, ignore=seed_only)), None)
        if home is None:
            groups.append([r])
        else:
            home.append(r)
    for name, groups in by_name.items():
        firsts = [g[0] for g in groups]  # the groups' labels compare them all alike (stages as trained only if all)
        as_trained = trained_stages_in_all(firsts)
        labels = [""] if len(groups) == 1 else distinguishing([view(r, as_trained) for r in firsts], ignore=seed_only)
        for group, label in zip(groups, labels):
            full = f"{name[:-1]}; {label})" if label else name
            seeds = [r["config"]["seed"] for r in group]
            twice = sorted({s for s in seeds if seeds.count(s) > 1})
            if twice:
                raise ValueError(
                    f"{full}: seed {twice[0]} is recorded by {seeds.count(twice[0])} runs of the same settings; keep "
                    "one (move the others out of the report's directories, e.g. to <sweep>.superseded/)"
                )
            for r in group:
                r[NAME_KEY] = full
    return runs


def run_name(run: dict[str, Any]) -> str:
    """The run's configuration's name as ``name_runs`` gave it (``config_name`` for a run it has not seen)."""
    return run.get(NAME_KEY) or config_name(run["config"])


def tiling_label(cfg: dict[str, Any]) -> str:
    """``, anyres 192x192`` for a tiled run (its pinpoints, ``max_tiles``), nothing for an untiled one: a tiled and an
    untiled run of the same components are two configurations in every table and paired comparison."""
    tiling = cfg.get("tiling")
    if not tiling:
        return ""
    label = f", {tiling['name']}"
    if tiling.get("grid_pinpoints"):
        label += " " + ",".join(f"{h}x{w}" for h, w in tiling["grid_pinpoints"])
    if tiling.get("max_tiles"):
        label += f" max {tiling['max_tiles']}"
    return label


RESULTS = ("results.json", "results.json.gz")  # a run's own file; gzipped as a sweep's record keeps it (sweeps/)


def results_files(path: Path) -> list[Path]:
    """The results of the runs under ``path`` (or ``path`` itself): ``results.json``, else ``results.json.gz``."""
    if path.name in RESULTS:
        return [path]
    found = {f.parent: f for f in sorted(path.rglob(RESULTS[1]))}
    found.update({f.parent: f for f in sorted(path.rglob(RESULTS[0]))})
    return [found[d] for d in sorted(found)]


def load_runs(paths: list[str | Path]) -> list[dict[str, Any]]:

    runs = []
    for p in paths:
        path = Path(p)
        files = results_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no results.json (is it a finished run directory?)")
        runs.extend(read_results(f) for f in files)
    return name_runs(runs)


def read_results(f: Path) -> dict[str, Any]:
    """One run's record: ``results.json`` or the ``results.json.gz`` a kept sweep holds."""
    return json.loads(gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_text())


def run_values(r: dict[str, Any], blind: bool = False) -> dict[str, float]:
    key = "blind" if blind else "accuracy"
    m = r["metrics"]
    out: dict[str, float] = {}
    for split in ("test", "compositional"):
        if split in m and key in m[split]:
            out[split] = m[split][key]["exact_match"]
    if "test" in m and key in m["test"]:
        for t, v in m["test"][key]["per_type"].items():
            out[t] = v
    if not blind:
        if r.get("visual_tokens_per_image"):
            out["tokens"] = r["visual_tokens_per_image"]["mean"]
        out["trainable"] = r["parameters"]["trainable"]
        out["samples_per_s"] = r["train_samples_per_second"]
        eff = r.get("efficiency") or {}
        if eff:
            out["connector_mflops"] = eff["flops"]["connector"] / 1e6
            out["prefill_mflops"] = eff["flops"]["llm_prefill"] / 1e6
            out["prefill_ms"] = eff["prefill_latency_ms"]
            out["decode_tps"] = eff["decode_tokens_per_second"]
        for task, entry in sorted((r.get("lmms_eval") or {}).items()):  # `bench eval RUN --tasks ...`
            metric = entry.get("headline") or next(iter(sorted(entry.get("metrics") or {})), None)
            if metric in (entry.get("metrics") or {}):
                out[f"{LMMS}{task}:{metric}"] = entry["metrics"][metric]
    return out


NOT_EVALUATED = "not evaluated"  # a split over no usable question (or eval_limit 0): shown so, never as a number


def not_evaluated(r: dict[str, Any]) -> set[str]:
    """The accuracy columns a run recorded no accuracy for: a split present in its metrics without ``accuracy``
    (every question dropped, or ``eval_limit`` 0), and the question types with the test split."""
    m = r["metrics"]
    out = {split for split in ("test", "compositional") if split in m and "accuracy" not in m[split]}
    return out | (set(QUESTION_TYPES) if "test" in out else set())


def builds_of(runs: list[dict[str, Any]]) -> Builds:
    """The runs' backbone builds (``bench.report.builds``), the runs named first: the one decision a report's rows
    and its note both take, so that a row's letters and the legend under the table cannot disagree."""
    if any(NAME_KEY not in r for r in runs):
        name_runs(runs)
    return backbone_builds(runs, run_name)


def aggregate(runs: list[dict[str, Any]], builds: Builds | None = None) -> list[dict[str, Any]]:
    """Rows: {"name", "seeds", col: (mean, std)}; blind baselines as rows of their own: one per LLM, and one per
    backbone build where the table mixes builds (two builds of a world LLM are two LLMs as loaded, and their blind
    answers differ). ``builds``: ``builds_of(runs)``, which the caller passes when it also writes the legend."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    seeds: dict[str, list[int]] = defaultdict(list)
    unmeasured: dict[str, set[str]] = defaultdict(set)
    letters: dict[str, set[str]] = defaultdict(set)  # a row's backbone builds where the table mixes them
    if any(NAME_KEY not in r for r in runs):
        name_runs(runs)
    if builds is None:
        builds = backbone_builds(runs, run_name)
    for r in runs:
        cfg = r["config"]
        name = run_name(r)
        groups[name].append(run_values(r))
        seeds[name].append(cfg["seed"])
        blind = f"blind baseline: {cfg['llm']['name']} without the image"
        if id(r) in builds.letter:
            blind += f" (backbones {builds.letter[id(r)]})"
        groups[blind].append(run_values(r, blind=True))
        seeds[blind].append(cfg["seed"])
        unmeasured[name] |= not_evaluated(r)
        unmeasured[blind] |= not_evaluated(r)
        if id(r) in builds.letter:
            letters[name].add(builds.letter[id(r)])
            letters[blind].add(builds.letter[id(r)])
    lmms = sorted({c for values in groups.values() for v in values for c in v if c.startswith(LMMS)})
    rows = []
    for name in sorted(groups):
        row: dict[str, Any] = {"name": name, "seeds": sorted(set(seeds[name]))}
        for col in [*COLUMNS, *lmms]:
            values = [v[col] for v in groups[name] if col in v]
            if values:
                row[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        # columns no seed measured: "not evaluated" in every table, not an empty cell that reads as "not asked"
        row["not_evaluated"] = sorted(c for c in unmeasured[name] if c not in row)
        if builds.mixed:
            row["build"] = "+".join(sorted(letters[name]))
        rows.append(row)
    compare_with_best(rows, runs)
    return rows


def per_question(runs: list[dict[str, Any]], name: str) -> dict[tuple[int, str], int]:
    """{(seed, question id): 0/1} on the test split for one configuration (runs that recorded it)."""
    out = {}
    if any(NAME_KEY not in r for r in runs):
        name_runs(runs)
    for r in runs:
        acc = r["metrics"].get("test", {}).get("accuracy", {})
        if run_name(r) == name and "per_question" in acc:
            pq = acc["per_question"]
            out.update({(r["config"]["seed"], qid): c for qid, c in zip(pq["ids"], pq["correct"])})
    return out


def compare_with_best(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    """Each configuration against the one with the best mean test accuracy, paired per question and seed
    (bench/stats.py): the difference with a bootstrap 95 % interval and McNemar's exact p-value."""

    ranked = [r for r in rows if "test" in r and not r["name"].startswith("blind")]
    if len(ranked) < 2:
        return
    top = max(ranked, key=lambda r: (r["test"][0], r["name"]))
    best_answers = per_question(runs, top["name"])
    if not best_answers:
        return
    top["vs_best"] = "best"
    for r in ranked:
        if r is not top:
            r["vs_best"] = paired(per_question(runs, r["name"]), best_answers)


def all_columns(rows: list[dict[str, Any]]) -> list[str]:
    lmms = sorted({c for r in rows for c in r if c.startswith(LMMS)})
    return [c for c in [*COLUMNS, *lmms] if any(c in r or c in r.get("not_evaluated", ()) for r in rows)]


def missing_cell(r: dict[str, Any], col: str) -> str:
    return NOT_EVALUATED if col in r.get("not_evaluated", ()) else ""


def best(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for col in all_columns(rows):
        higher = column_info(col)[1]
        values = [r[col][0] for r in rows if col in r and not r["name"].startswith("blind")]
        if values:
            out[col] = max(values) if higher else min(values)
    return out


def fmt(col: str, mean: float, std: float, with_std: bool) -> str:
    if col.startswith(LMMS):  # as lmms-eval reports it (a fraction, or a score such as MME's)
        return f"{mean:.3f} ± {std:.3f}" if with_std else f"{mean:.3f}"
    if col == "trainable":
        text = f"{mean:,.0f}"
    elif col in ("tokens", "samples_per_s", "decode_tps", "connector_mflops", "prefill_mflops"):
        text = f"{mean:.1f}"
    elif col == "prefill_ms":
        text = f"{mean:.2f}"
        return f"{text} ± {std:.2f}" if with_std else text
    else:
        text = f"{100 * mean:.1f}"
        std *= 100
    return f"{text} ± {std:.1f}" if with_std and col not in ("trainable",) else text


VS_BEST = "test vs best: diff [95 % CI], McNemar p"


def vs_best_text(value: Any) -> str:
    if value is None or value == "best":
        return value or ""
    return f"{100 * value['diff']:+.1f} [{100 * value['low']:+.1f}, {100 * value['high']:+.1f}], p={value['p']:.2g}"


#: the column of a table whose runs are of several builds of one backbone recipe (``bench.report.builds``)
BUILD = "backbones"


def table(rows: list[dict[str, Any]], style: str = "markdown", builds_note: str = "") -> str:
    """The rows as a ``markdown``, ``csv`` or ``latex`` table; ``builds_note`` (``bench.report.builds.legend_note``)
    is the markdown note's account of the rows' backbone builds, each row's letters in its own column."""
    cols = all_columns(rows)
    with_std = any(len(r["seeds"]) > 1 for r in rows)
    with_pairs = any("vs_best" in r for r in rows)
    with_builds = any("build" in r for r in rows)
    top = best(rows)
    lead = ["configuration", "seeds", *([BUILD] if with_builds else [])]
    header = [*lead, *[column_info(c)[0] for c in cols], *([VS_BEST] if with_pairs else [])]
    body = []
    for r in rows:
        cells = [r["name"], str(len(r["seeds"])), *([r.get("build", "")] if with_builds else [])]
        for c in cols:
            if c not in r:
                cells.append(missing_cell(r, c))
                continue
            text = fmt(c, *r[c], with_std)
            marked = not r["name"].startswith("blind") and abs(r[c][0] - top.get(c, float("nan"))) < 1e-12
            cells.append((f"**{text}**" if style == "markdown" else f"\\textbf{{{text}}}") if marked else text)
        if with_pairs:
            cells.append(vs_best_text(r.get("vs_best")))
        body.append(cells)
    if style == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            pair = r.get("vs_best")
            extra = (
                []
                if not with_pairs
                else [pair]
                if pair in (None, "best")
                else [f"{pair['diff']:.6g} [{pair['low']:.6g}, {pair['high']:.6g}] p={pair['p']:.3g}"]
            )
            writer.writerow(
                [r["name"], len(r["seeds"]), *([r.get("build", "")] if with_builds else [])]
                + [missing_cell(r, c) if c not in r else f"{r[c][0]:.6g}" for c in cols]
                + extra
            )
        return buf.getvalue()
    if style == "latex":
        esc = lambda t: t.replace("_", "\\_").replace("±", "$\\pm$").replace("%", "\\%")  # noqa: E731
        lines = [
            "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
            "\\toprule",
            " & ".join(esc(h) for h in header) + " \\\\",
            "\\midrule",
        ]
        lines += [" & ".join(esc(c) for c in cells) + " \\\\" for cells in body]
        return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    note = (
        "accuracy in % (exact match), mean ± std over seeds; best per column in bold; "
        "blind = the LLM as loaded, answering without the image"
    )
    if any(c.startswith(LMMS) for c in cols):
        note += "; <task> <metric>: lmms-eval's score of the task (`bench eval RUN --tasks`), as lmms-eval reports it"
    if with_pairs:
        note += (
            "; test vs best: each configuration against the best on the same questions and seeds, the accuracy "
            "difference in points with a paired bootstrap 95 % interval and McNemar's exact p-value"
        )
    if builds_note:
        note += f"; {builds_note}"
    return "\n".join(lines) + f"\n\n{note}\n"


def write_reports(run_paths: list[str | Path], out_dir: Path) -> dict[str, Path]:

    runs = load_runs(run_paths)
    builds = builds_of(runs)
    rows, note = aggregate(runs, builds), legend_note(builds)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for style, ext in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
        path = out_dir / f"table.{ext}"
        with atomic_path(path) as tmp:
            tmp.write_text(table(rows, style, builds_note=note))
        written[style] = path
    return written
