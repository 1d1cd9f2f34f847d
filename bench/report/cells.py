"""What makes two runs one configuration: a sweep's cell and a report's row.

A run's name in a table (``config_name``: encoder, connector and its settings, LLM, recipe, tiling) does not say
everything that decides what it trained and measured: the data options (``--qa-turns``, ``--world-llm``, the
world encoder's input side ...), the stages as trained, the evaluation limit, the precision, LoRA. ``bench sweep``
re-runs a cell recorded with other such settings (``bench.report.sweep``), and ``bench report`` keeps two runs of one
name apart when they differ in them (``bench.report.tables.name_runs``): averaged as seeds of one row, or paired on
the same questions, they would be a number of no configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

from bench.data.world import WorldConfig
from bench.train.settings import RunConfig, StageConfig

# the settings that decide what a cell trains and measures (a cell's name says only the components and the seed)
CELL_SETTINGS = (
    "encoder",
    "connector",
    "llm",
    "seed",
    "recipe",
    "stages",
    "data",
    "eval_limit",
    "precision",
    "lora",
    "qlora",
    "init_connector",
    "max_length",
    "tiling",
)

# stage settings that change neither the trained weights nor anything the report shows: the validation loss they
# bound only picks checkpoint-best and is logged (a run's accuracy is measured on the weights as trained), and a
# checkpoint's interval only decides where a killed run resumes from
LOGGED_ONLY = ("val_limit", "save_every")


def as_json(value: Any) -> Any:
    """``value`` as a JSON file holds it (tuples are lists there)."""
    return json.loads(json.dumps(value))


def view(record: dict[str, Any], as_trained: bool) -> dict[str, Any]:
    """The CELL_SETTINGS of one record (``{"config": ..., "stages": ...}`` as ``results.json`` holds it) as records
    compare: a setting its config does not name is RunConfig's default (as it was when the record was written); a
    world is the world it makes (a later setting at its default is the world recorded without it); the stages are
    the ones trained (a recipe's, written out) when ``as_trained`` (every record compared holds them), else as
    configured; a stage setting added later counts as its default, and LOGGED_ONLY ones not at all."""
    defaults = as_json(dataclasses.asdict(RunConfig()))
    had = record.get("config") or {}
    out = {k: as_json(had.get(k, defaults[k])) for k in CELL_SETTINGS}
    data = out.get("data")  # no world named (bench run's) is the default one
    if isinstance(data, dict) and data.get("kind", "world") == "world" and isinstance(data.get("world", {}), dict):
        with contextlib.suppress(TypeError, ValueError):  # not a world this code makes: compared as written
            out["data"] = {**data, "world": as_json(WorldConfig(**data.get("world", {})).as_dict())}
    if as_trained:
        out["stages"] = as_json(record["stages"])
    return {k: stage_view(v, k) for k, v in out.items()}


def trained_stages_in_all(records: list[dict[str, Any]]) -> bool:
    """Whether every record holds its stages as trained (records written before they did hold the config's)."""
    return all(isinstance(r.get("stages"), list) for r in records)


def compared_views(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two records' :func:`view` as they compare: the stages as trained when both hold them."""
    as_trained = trained_stages_in_all([a, b])
    return view(a, as_trained), view(b, as_trained)


def differing(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The CELL_SETTINGS (but ``ignore``) in which two records differ (:func:`compared_views`)."""
    va, vb = compared_views(a, b)
    return [k for k in CELL_SETTINGS if k not in ignore and va[k] != vb[k]]


def as_record(cfg: RunConfig) -> dict[str, Any]:
    """A RunConfig as a record of it would hold its settings: the config and its stages as trained."""
    return {"config": dataclasses.asdict(cfg), "stages": [dataclasses.asdict(s) for s in cfg.resolved_stages()]}


def stage_view(value: Any, key: str) -> Any:
    """A ``stages`` list as compared: each stage with StageConfig's defaults for settings added after it was recorded,
    without the LOGGED_ONLY ones; any other setting as it is."""
    if key != "stages" or not isinstance(value, list):
        return value
    defaults = dataclasses.asdict(StageConfig())
    return [
        {k: v for k, v in {**defaults, **st}.items() if k not in LOGGED_ONLY} if isinstance(st, dict) else st
        for st in value
    ]


def flat(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2]}`` under ``prefix`` as ``{"prefix.a.b": 1, "prefix.c.0": 2}``."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}
    if isinstance(value, list) and value and all(isinstance(x, dict | list) for x in value):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}.{i}").items()}
    return {prefix: value}


def distinguishing(views: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[str]:
    """For records that differ (their :func:`view`, one per record), a label each: the settings (but
    ``ignore``) in which it differs from the others, as ``key.path=value``; a setting it leaves unset or at
    RunConfig's default is not named, so of several records the one at the defaults keeps an empty label (its plain
    name)."""
    defaults = {k: as_json(v) for k, v in dataclasses.asdict(RunConfig()).items()}
    keys = [k for k in CELL_SETTINGS if k not in ignore]
    flats = [{k: v for key in keys for k, v in flat(view[key], key).items()} for view in views]
    default_flat = {k: v for key in keys for k, v in flat(defaults.get(key), key).items()}
    paths = sorted({p for f in flats for p in f if len({json.dumps(g.get(p), sort_keys=True) for g in flats}) > 1})
    return [
        "; ".join(f"{p}={f[p]}" for p in paths if p in f and f[p] is not None and f[p] != default_flat.get(p))
        for f in flats
    ]
