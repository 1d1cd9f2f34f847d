"""Which build of its backbones each run trained on, and whether a table mixes builds.

The mini world's backbones (its CLIP encoder, its world LLM) are trained from a recipe by the machine that first
needs them, and a record names the recipes (``backbones``). One recipe built on two CPU types is two sets of bytes:
their kernels round differently (the kept pretrained-level records' encoder, built on AMD EPYC machines, and the same
recipe rebuilt on an Intel Xeon differ in every weight), so two records of one configuration on two builds differ as
if their backbones had had another seed. A record holds two kinds of evidence of its bytes:

- ``backbone_bytes`` (records since December 7, 2026): a digest of each backbone checkpoint's manifest of SHA-256s,
  the encoder's and the LLM's;
- ``feature_cache.dir`` (a run with the feature cache on): the encoder's feature cache, whose key digests the
  encoder's weight bytes (and its checkpoint's path, so a run under another ``CONNECTOR_ZOO_CACHE`` reads as
  another build: an alarm too many, never one missed).

Records of one recipe are compared on the best evidence all of them hold (the encoder's bytes, else its feature
cache key; the LLM's bytes only where every record has them): more than one value among them is a table that mixes
builds, and ``bench report`` then gives each such run's row a build letter, with a legend saying what each letter is.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the length of a feature cache directory's name that is the encoder's ``cache_key()`` (a request's suffix follows)
FEATURE_KEY_CHARS = 24


def evidence(record: dict[str, Any]) -> dict[str, str]:
    """What a record says of its backbones' bytes: ``encoder bytes``, ``LLM bytes`` (``backbone_bytes``) and
    ``encoder features`` (its feature cache's key, when the cache was on)."""
    out = {}
    cache = record.get("feature_cache") or {}
    if cache.get("on") and cache.get("dir"):
        out["encoder features"] = Path(cache["dir"]).name[:FEATURE_KEY_CHARS]
    held = record.get("backbone_bytes") or {}
    if held.get("encoder"):
        out["encoder bytes"] = held["encoder"]
    if held.get("llm"):
        out["LLM bytes"] = held["llm"]
    return out


def machine_text(record: dict[str, Any]) -> str:
    """The machine a record ran on, as it recorded it (records before December 7, 2026 did not)."""
    machine = record.get("machine") or {}
    if not machine.get("cpu"):
        return "machine not recorded"
    isa = f" ({', '.join(machine['isa'])})" if machine.get("isa") else ""
    return f"{machine['cpu']}{isa}" + (f", {machine['cuda']}" if machine.get("cuda") else "")


@dataclass
class Builds:
    """``letter``: id(run) -> its build's letter, for the runs of a recipe whose records are of several builds (no
    letter where a table holds one build of each recipe); ``legend``: a line per letter; ``untold``: the names of the
    runs whose build cannot be compared with their recipe's other runs (no evidence they all hold)."""

    letter: dict[int, str] = field(default_factory=dict)
    legend: list[str] = field(default_factory=list)
    untold: list[str] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return bool(self.letter)


def backbone_builds(runs: list[dict[str, Any]], name_of: Callable[[dict[str, Any]], str]) -> Builds:
    """The builds of the runs' backbones, recipe by recipe (``runs``: records as ``load_runs`` gives them;
    ``name_of``: a run's configuration's name, ``bench.report.tables.run_name``, for the runs it cannot tell)."""
    by_recipe: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r.get("backbones"):  # published data has no built backbones
            by_recipe[json.dumps(r["backbones"], sort_keys=True)].append(r)
    out = Builds()
    for recipe in sorted(by_recipe):
        group = by_recipe[recipe]
        held = [evidence(r) for r in group]
        encoder = next((k for k in ("encoder bytes", "encoder features") if all(k in e for e in held)), None)
        llm = "LLM bytes" if all("LLM bytes" in e for e in held) else None
        if encoder is None and llm is None:
            if len(group) > 1:
                out.untold += sorted({name_of(r) for r in group})
            continue
        keys = [k for k in (encoder, llm) if k is not None]
        values: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for r, e in zip(group, held):
            values[tuple(e[k] for k in keys)].append(r)
        if len(values) < 2:
            continue
        names = json.loads(recipe)
        recipes = ", ".join(str(names[k]) for k in ("encoder", "llm") if names.get(k))
        for value in sorted(values):
            letter = chr(ord("A") + len(out.legend)) if len(out.legend) < 26 else f"#{len(out.legend) + 1}"
            members = values[value]
            for r in members:
                out.letter[id(r)] = letter
            said = "; ".join(f"{k} {v[:8]}" for k, v in zip(keys, value))
            unsaid = "" if llm else "; LLM bytes not recorded by all"
            machines = ", ".join(sorted({machine_text(r) for r in members}))
            runs_said = f"{len(members)} run{'s' if len(members) > 1 else ''}"
            out.legend.append(f"{letter}: {recipes} as {said}{unsaid} ({runs_said}; ran on {machines})")
    return out


def legend_note(builds: Builds) -> str:
    """The table's note on its builds: empty for a table of one build of each recipe."""
    note = ""
    if builds.mixed:
        note = (
            "backbones: the table mixes builds of one backbone recipe (trained from the same recipe on machines whose "
            "kernels round differently); two builds differ as if the backbones had another seed, so a difference "
            "between rows of other builds is not the connector's alone. " + "; ".join(builds.legend)
        )
    if builds.untold:
        note += ("; " if note else "") + (
            "the backbone builds of " + ", ".join(builds.untold) + " cannot be told apart (no feature cache and no "
            "backbone_bytes in their records)"
        )
    return note
