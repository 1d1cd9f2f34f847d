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

import torch

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


def cell_name(encoder: str, connector: dict[str, Any], llm: str, seed: int, recipe: str | None = None) -> str:
    """``clip--cls_prune-keep_ratio0.5--tinyllama--s0``; with ``recipe`` (a recipe other than the level's default),
    ``...--s0--mini-paper-rates``, so that one sweep folder holds a configuration under several recipes."""
    settings = "-".join(f"{k}{v}" for k, v in sorted(connector.items()) if k != "name")
    label = connector["name"] + (f"-{settings}" if settings else "")
    tail = f"--{recipe}" if recipe else ""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{encoder}--{label}--{llm}--s{seed}{tail}")


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
    recipe_in_name: bool = False,
) -> list[Path]:
    """Run every cell not already recorded with these settings, one after another in this process; with ``slurm``
    (:class:`bench.report.slurm.SlurmSettings`), submit them instead, one Slurm job each (``bench.report.slurm``).
    ``recipe_in_name`` (``bench sweep`` sets it for a recipe other than the level's default): the cells' names end in
    the recipe's, so that they sit beside the default recipe's cells of one folder instead of replacing them; a cell
    of the plain name recorded (or started) with exactly these settings, as sweeps wrote them before, is kept as it
    is and counts."""
    cells = list(itertools.product(encoders, [parse_connector(c) for c in connectors], llms, seeds))
    warned = set()
    for enc, conn, llm, seed in cells:  # before hours are spent: will these cells make the folder mix builds?
        cfg = RunConfig(encoder={"name": enc}, connector=conn, llm={"name": llm}, seed=seed, **base)
        recipe = json.dumps(world_backbones(cfg), sort_keys=True)
        if recipe not in warned:
            warned.add(recipe)
            said = other_builds(out, cfg)
            if said:
                log(said)
    done, submit = [], []
    active = {}
    if slurm is not None:  # cells whose job is still queued or running are not submitted twice
        from bench.report.slurm import active_jobs

        active = active_jobs(out)
    for i, (enc, conn, llm, seed) in enumerate(cells, start=1):
        cfg = RunConfig(encoder={"name": enc}, connector=conn, llm={"name": llm}, seed=seed, **base)
        cell = out / cell_name(enc, conn, llm, seed, cfg.recipe if recipe_in_name else None)
        plain = out / cell_name(enc, conn, llm, seed)
        if cell != plain and not cell.exists() and plain.exists() and why_other(plain, cfg) is None:
            cell = plain  # this configuration's cell as an earlier sweep named it
        tag = f"[{i}/{len(cells)}] {cell.name}"
        # a finished cell, or its gzipped record (sweeps/), trained on the backbones this code builds
        recorded = any((cell / name).exists() for name in RESULTS)
        if recorded and same_cell(cell, cfg, log=lambda m, tag=tag: log(f"{tag}: {m}")):
            log(f"{tag}: finished, skipped")
        elif cell.name in active:
            log(f"{tag}: in Slurm as job {active[cell.name]}, not submitted again")
        else:
            # an unfinished cell resumes from its own config.json: only if that is this sweep's cell
            resume = (cell / "config.json").exists() and same_cell(cell, cfg, log=lambda m, tag=tag: log(f"{tag}: {m}"))
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


def other_builds(out: Path, cfg: RunConfig) -> str | None:
    """A warning where records kept in ``out`` on the backbone recipes ``cfg`` trains on are of another build of them
    than this machine's (``bench.report.builds``: one recipe trained on two CPU types is two sets of bytes), so that
    the cells this sweep adds will make the folder's table mix builds; None where nothing says so. Compared on the
    bytes (``backbone_bytes``) where this machine has built the backbones and the records hold them, else on the
    machine the records name: a record of another CPU model or instruction set was made on backbones built there,
    unless this machine copied them. Records from before December 7, 2026 hold neither: they are compared on their
    encoder's feature cache key with the key of a record of this machine's encoder bytes, where the folder has one.
    Reads only; said at the start, before hours are spent, not in the report after."""
    from bench.data.world import WorldConfig, world_dir
    from bench.report.builds import evidence, machine_text
    from bench.run.record import manifest_digest
    from bench.train.precision import machine_info

    want = world_backbones(cfg)
    if want is None or not out.is_dir():
        return None
    records = []
    for cell in sorted(p for p in out.iterdir() if p.is_dir() and any((p / n).exists() for n in RESULTS)):
        try:
            records += [r for r in load_runs([cell]) if r.get("backbones") == want]
        except (OSError, ValueError):
            continue  # an unreadable record is the cell's own business (same_cell sets it aside)
    if not records:
        return None
    home = world_dir(WorldConfig(**cfg.data.get("world", {}))) / "backbones"
    mine = {k: manifest_digest(want[k] if Path(want[k]).is_dir() else home / want[k]) for k in ("encoder", "llm")}
    here = machine_info()
    other_bytes = [
        r
        for r in records
        if any(mine[k] and (r.get("backbone_bytes") or {}).get(k) not in (None, mine[k]) for k in mine)
    ]
    # a record without bytes (before December 7) still names its encoder's feature cache key: where a record of this
    # machine's encoder bytes names its key too, a record of another key is of another build
    held = [(r, evidence(r)) for r in records]
    my_keys = {
        e.get("encoder features") for _, e in held if mine["encoder"] and e.get("encoder bytes") == mine["encoder"]
    }
    my_keys.discard(None)
    if my_keys:
        other_bytes += [
            r for r, e in held if "encoder bytes" not in e and e.get("encoder features") not in (None, *my_keys)
        ]
    mine_said = machine_text({"machine": here})
    if other_bytes:
        what = f"hold other bytes of them than this machine's build ({mine_said})"
    elif any(mine.values()):
        return None  # built here, and no record says other bytes (records without backbone_bytes cannot say)
    else:
        other_bytes = [r for r in records if r.get("machine") and machine_text(r) != mine_said]
        if not other_bytes:
            return None
        theirs = ", ".join(sorted({machine_text(r) for r in other_bytes}))
        what = f"ran on another machine ({theirs}) than this one ({mine_said}), which has not built them yet"
    return (
        f"note: {out}: {len(other_bytes)} of its {len(records)} records on these backbone recipes {what}. One recipe "
        "trained on two CPU types is two sets of bytes, so the cells this sweep adds make the folder's table mix "
        "backbone builds (bench report gives each row its builds). To keep one build, copy the records' backbones "
        f"into {home} first, or give another --out"
    )


def other_settings(record: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The CELL_SETTINGS in which ``record``'s config differs from ``cfg`` (``bench.report.cells``: a setting it does
    not name counts as RunConfig's default, as it was when the record was written; stages as trained when the record
    holds them)."""
    return differing(record, as_record(cfg))


def cell_state(cell: Path) -> tuple[dict[str, Any], dict[str, str] | None, str]:
    """What ``cell`` holds: its record (or, for a started run, ``{"config": <its config.json>}``), the backbones it
    was made (or started) on, and "recorded" or "started". An unreadable config.json raises OSError or ValueError."""
    if any((cell / name).exists() for name in RESULTS):
        (record,) = load_runs([cell])
        return record, record.get("backbones"), "recorded"
    return {"config": json.loads((cell / "config.json").read_text())}, started_backbones(cell), "started"


def why_other(cell: Path, cfg: RunConfig) -> str | None:
    """None when ``cell`` holds ``cfg``'s run: finished (its record) or started (its config.json), with ``cfg``'s
    settings (CELL_SETTINGS: recipe, data options such as ``qa_turns`` or the world LLM level, ...) on the backbones
    ``cfg`` would build; else why not. A record from before backbones were recorded, or a run started before runs
    wrote ``backbones.json``, counts as other backbones. Reads only."""
    try:
        record, had, verb = cell_state(cell)
    except (OSError, ValueError) as err:
        return f"its config.json does not read ({err})"
    differ, want = other_settings(record, cfg), world_backbones(cfg)
    if differ:
        return f"{verb} with other settings ({', '.join(differ)})"
    if want is not None and had != want:
        on = "with" if verb == "recorded" else "on"
        return f"{verb} {on} other backbones ({had or 'not recorded'}; this code builds {want})"
    return None


def same_cell(cell: Path, cfg: RunConfig, log=print) -> bool:
    """Whether ``cell`` holds ``cfg``'s run (:func:`why_other`): a record trained with ``cfg``'s settings on the
    backbones ``cfg`` would build, or an unfinished run (a killed sweep's) started so, which resuming (it trains what
    its own config.json says) finishes as this sweep's cell; if not, the cell moves to ``<sweep>.superseded/<cell>/``
    and runs afresh."""
    why = why_other(cell, cfg)
    if why is not None:
        refuse_other_machines_world_llm(cell, cfg)
        supersede(cell, why, log)
    return why is None


def refuse_other_machines_world_llm(cell: Path, cfg: RunConfig) -> None:
    """Stop, moving nothing, when ``cell`` was recorded (or started) on the world LLM this code builds but fine-tuned
    at the other precision: a pretrained level fine-tunes its world LLM in bf16 where the CPU multiplies bf16 faster
    and in fp32 elsewhere, so kept records made on one kind of machine would all be set aside and run again on the
    other. Said with the switch that builds the records' own world LLM."""
    from bench.train.world_llm import precision_reason, pretrained_precision

    try:
        record, had, _ = cell_state(cell)
    except (OSError, ValueError):
        return  # unreadable: set aside as why_other says
    if other_settings(record, cfg):
        return  # another cell under this name: set aside as any other
    mine = pretrained_precision()
    theirs = next((p for p in ("bf16", "fp32") if p != mine and had == world_backbones(cfg, llm_precision=p)), None)
    if theirs is None:
        return
    own = "another --out for a zoo of this machine's own world LLM. Nothing was moved"
    if torch.cuda.is_available():  # the switch decides a CPU's choice only
        what = f"Give {own}"
    else:
        flag = "1" if theirs == "bf16" else "0"
        what = f"To add to these records, build theirs: set CONNECTOR_ZOO_CPU_BF16={flag} for this sweep; or give {own}"
    raise ValueError(
        f"{cell} was made on the world LLM fine-tuned under {theirs} ({had['llm']}); this machine fine-tunes it "
        f"under {mine} ({precision_reason()}), which is another world LLM, and every such cell would run again. {what}"
    )


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
