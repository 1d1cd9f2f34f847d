"""Where a connector loses on the mini world: accuracy by the size of the object a question is about and by the
number of objects in the image, per configuration, from the per-question scores in ``results.json``.

A question's *referents* are the objects its words pick out (the templates of :func:`bench.data.world.questions`):
the shape of a colour question, the colour of a shape question, the colour and shape of a size, position or
existence question, both objects of a relation, every object counted. Its size bucket is ``small`` or ``large``
when all its referents have that size, ``mixed`` when they differ, ``none`` when it has none (an absent object, a
count of zero).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from typing import Any

from bench.data.world import COLOURS, SHAPES

_C, _S = "|".join(COLOURS), "|".join(SHAPES)
# question type -> (pattern, which groups name (colour, shape) pairs); None in a pair matches any value
TEMPLATES: dict[str, tuple[re.Pattern, list[tuple[str | None, str | None]]]] = {
    "colour": (re.compile(rf"What colour is the (?P<s>{_S})\?"), [(None, "s")]),
    "shape": (re.compile(rf"What shape is the (?P<c>{_C}) object\?"), [("c", None)]),
    "size": (re.compile(rf"What size is the (?P<c>{_C}) (?P<s>{_S})\?"), [("c", "s")]),
    "position": (re.compile(rf"Where is the (?P<c>{_C}) (?P<s>{_S})\?"), [("c", "s")]),
    "exist": (re.compile(rf"Is there a (?P<c>{_C}) (?P<s>{_S})\?"), [("c", "s")]),
    "relation": (
        re.compile(rf"Is the (?P<c>{_C}) (?P<s>{_S}) (?:left of|above) the (?P<c2>{_C}) (?P<s2>{_S})\?"),
        [("c", "s"), ("c2", "s2")],
    ),
    "count": (re.compile(rf"How many (?:(?P<c>{_C}) )?objects are there\?"), [("c", None)]),
}
SIZE_BUCKETS = ("small", "large", "mixed", "none")


def referents(question: str, qtype: str, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects of the scene a world question is about (see the module docstring)."""
    if qtype not in TEMPLATES:
        raise ValueError(f"no referent rule for question type {qtype!r}")
    pattern, pairs = TEMPLATES[qtype]
    match = pattern.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"{qtype} question {question!r} does not follow the world's template")
    out = []
    for colour_group, shape_group in pairs:
        colour = match.group(colour_group) if colour_group else None
        shape = match.group(shape_group) if shape_group else None
        out += [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"]) and o not in out]
    return out


def size_bucket(objs: list[dict[str, Any]]) -> str:
    sizes = {o["size"] for o in objs}
    return "none" if not sizes else sizes.pop() if len(sizes) == 1 else "mixed"


def question_facts(world, split: str = "test") -> dict[str, dict[str, Any]]:
    """{sample id: type, question, truth, objects in the image, size bucket, image index} for a world split (ids as
    :func:`bench.data.formats.world_dataset` gives them)."""
    out = {}
    for index, record in enumerate(world.records(split)):
        for j, qa in enumerate(record["qa"]):
            refs = referents(qa["question"], qa["type"], record["objects"])
            out[f"{record['id']}/q{j}"] = {
                "type": qa["type"],
                "question": qa["question"],
                "truth": qa["answer"],
                "objects": len(record["objects"]),
                "size": size_bucket(refs),
                "image": index,
            }
    return out


def breakdown(runs: list[dict[str, Any]], facts: dict[str, dict[str, Any]], name_of) -> dict[str, dict[str, Any]]:
    """Per configuration (``name_of(run)``): accuracy on the test split by size bucket and by number of objects, as
    mean and std over seeds of each seed's accuracy in the bucket, with the number of questions per seed.

    {config: {"size": {bucket: (mean, std, n)}, "objects": {k: (mean, std, n)}}}; questions not in ``facts`` (another
    world) are ignored.
    """
    # (config, axis, bucket) -> seed -> [0/1, ...]
    scores: dict[tuple[str, str, Any], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        pq = r["metrics"].get("test", {}).get("accuracy", {}).get("per_question")
        if not pq:
            continue
        name, seed = name_of(r), r["config"]["seed"]
        for qid, correct in zip(pq["ids"], pq["correct"]):
            fact = facts.get(qid)
            if fact is not None:
                scores[(name, "size", fact["size"])][seed].append(correct)
                scores[(name, "objects", fact["objects"])][seed].append(correct)
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"size": {}, "objects": {}})
    for (name, axis, bucket), by_seed in sorted(scores.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        accs = [sum(v) / len(v) for _, v in sorted(by_seed.items())]
        n = round(statistics.fmean(len(v) for v in by_seed.values()))
        out[name][axis][bucket] = (statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, n)
    return dict(out)
