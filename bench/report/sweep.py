"""``bench sweep``: a grid of encoders x connectors (with settings) x LLMs x seeds, each cell a normal run directory.

Cells already finished (``results.json`` present) are skipped and unfinished ones resumed, so a killed sweep continues
where it stopped. A finished mini-world cell counts as finished only if it was trained on the backbones this code
builds (the world's key and the backbone recipes, ``world_backbones``): a record of other backbones is moved to
``<out>.superseded/<cell>/`` (kept, out of the report's way) and the cell runs again. All cells share the
frozen-encoder feature cache. At the end the tables and plots are written.
Connector settings go in brackets: ``cls_prune[keep_ratio=0.25]``, ``qformer[num_queries=16]``.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from bench.report.cells import as_record, differing
from bench.report.tables import RESULTS, load_runs
from bench.run.job import run, started_backbones
from bench.train.pretrain import world_backbones
from bench.train.settings import RunConfig
from connector_zoo.settings import parse_settings


def split_list(text: str) -> list[str]:
    """Split on commas outside brackets: ``a,b[x=1,y=2]`` -> ``["a", "b[x=1,y=2]"]``."""
    return [p.strip() for p in re.split(r",(?![^\[]*\])", text) if p.strip()]


def parse_connector(text: str) -> dict[str, Any]:

    match = re.fullmatch(r"([^\[\]]+)(?:\[(.*)\])?", text)
    if not match:
        raise ValueError(f"connector {text!r} must look like name or name[key=value,key=value]")
    name, settings = match.group(1), match.group(2)
    return {"name": name, **parse_settings(split_list(settings) if settings else [])}


def cell_name(encoder: str, connector: dict[str, Any], llm: str, seed: int) -> str:
    settings = "-".join(f"{k}{v}" for k, v in sorted(connector.items()) if k != "name")
    label = connector["name"] + (f"-{settings}" if settings else "")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{encoder}--{label}--{llm}--s{seed}")


def cell_tags(encoder: str, connector: dict[str, Any], llm: str, seed: int) -> list[str]:
    """A cell's settings as tracker tags: ``encoder:clip``, ``connector:cls_prune``, ``keep_ratio:0.5``, ..."""
    settings = [f"{k}:{v}" for k, v in sorted(connector.items()) if k != "name"]
    return [f"encoder:{encoder}", f"connector:{connector['name']}", *settings, f"llm:{llm}", f"seed:{seed}"]


def sweep(
    out: Path,
    encoders: list[str],
    connectors: list[str],
    llms: list[str],
    seeds: list[int],
    base: dict[str, Any],
    log=print,
    slurm=None,
) -> list[Path]:
    """Run every cell not already recorded with these settings, one after another in this process; with ``slurm``
    (:class:`bench.report.slurm.SlurmSettings`), submit them instead, one Slurm job each (``bench.report.slurm``)."""
    cells = list(itertools.product(encoders, [parse_connector(c) for c in connectors], llms, seeds))
    done, submit = [], []
    active = {}
    if slurm is not None:  # cells whose job is still queued or running are not submitted twice
        from bench.report.slurm import active_jobs

        active = active_jobs(out)
    for i, (enc, conn, llm, seed) in enumerate(cells, start=1):
        cell = out / cell_name(enc, conn, llm, seed)
        cfg = RunConfig(encoder={"name": enc}, connector=conn, llm={"name": llm}, seed=seed, **base)
        tag = f"[{i}/{len(cells)}] {cell.name}"
        # a finished cell, or its gzipped record (sweeps/), trained on the backbones this code builds
        recorded = any((cell / name).exists() for name in RESULTS)
        if recorded and same_cell(cell, cfg, log=lambda m, tag=tag: log(f"{tag}: {m}")):
            log(f"{tag}: finished, skipped")
        elif cell.name in active:
            log(f"{tag}: in Slurm as job {active[cell.name]}, not submitted again")
        else:
            # an unfinished cell resumes from its own config.json: only if that is this sweep's cell
            resume = (cell / "config.json").exists() and same_unfinished_cell(
                cell, cfg, log=lambda m, tag=tag: log(f"{tag}: {m}")
            )
            log(f"{tag}: {'resuming' if resume else 'running'}" + (" (to Slurm)" if slurm is not None else ""))
            # a cell's config.json was written by this sweep from the names given now: a dotted path the user typed
            # may be resolved again on resume
            dotted = any(":" in name for name in (enc, conn["name"], llm))
            tracking = {"group": out.name, "tags": cell_tags(enc, conn, llm, seed)}  # trackers group a sweep's cells
            if slurm is not None:
                submit.append((cell, cfg, dotted, tracking))
            else:
                say = lambda m: log("    " + m)  # noqa: E731
                run(cfg, cell, resume=resume, log=say, allow_dotted_paths=dotted, tracking=tracking)
        done.append(cell)
    if submit:
        from bench.report.slurm import submit as submit_jobs

        submit_jobs(out, submit, slurm, log=log)
    return done


def other_settings(record: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The CELL_SETTINGS in which ``record``'s config differs from ``cfg`` (``bench.report.cells``: a setting it does
    not name counts as RunConfig's default, as it was when the record was written; stages as trained when the record
    holds them)."""
    return differing(record, as_record(cfg))


def same_cell(cell: Path, cfg: RunConfig, log=print) -> bool:
    """Whether ``cell``'s record was trained with ``cfg``'s settings (CELL_SETTINGS: recipe, data options such as
    ``qa_turns`` or the world LLM level, ...) on the backbones ``cfg`` would build; if not, the record moves to
    ``<sweep>.superseded/<cell>/`` (a record from before backbones were recorded counts as other backbones)."""
    (record,) = load_runs([cell])
    differ = other_settings(record, cfg)
    want = world_backbones(cfg)
    had = record.get("backbones")
    if not differ and (want is None or had == want):
        return True
    why = (
        f"recorded with other settings ({', '.join(differ)})"
        if differ
        else f"recorded with other backbones ({had or 'not recorded'}; this code builds {want})"
    )
    supersede(cell, why, log)
    return False


def same_unfinished_cell(cell: Path, cfg: RunConfig, log=print) -> bool:
    """Whether the unfinished run in ``cell`` (a killed sweep's) was started with ``cfg``'s settings, so that resuming
    it, which trains what its own config.json says, finishes this sweep's cell; if not, it moves aside as
    :func:`same_cell`'s records do and the cell starts afresh. Its backbones are those its ``backbones.json`` says it
    started on (a cell started before runs wrote that file counts as other backbones, as a record without them does)."""
    try:
        started = json.loads((cell / "config.json").read_text())
    except (OSError, ValueError) as err:
        supersede(cell, f"its config.json does not read ({err})", log)
        return False
    differ = other_settings({"config": started}, cfg)
    want, had = world_backbones(cfg), started_backbones(cell)
    if not differ and (want is None or had == want):
        return True
    why = (
        f"started with other settings ({', '.join(differ)})"
        if differ
        else f"started on other backbones ({had or 'not recorded'}; this code builds {want})"
    )
    supersede(cell, why, log)
    return False


def supersede(cell: Path, why: str, log=print) -> None:
    """Move ``cell`` to ``<sweep>.superseded/<cell>`` (``<cell>.2``, ... when taken) and say why."""
    target = cell.parent.with_name(cell.parent.name + ".superseded") / cell.name
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{cell.name}.{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    cell.rename(target)
    log(f"{why}: moved to {target}, running again")
