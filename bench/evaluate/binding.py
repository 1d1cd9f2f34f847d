"""Does a model bind attributes to objects? Mini-world answers split by how crowded the scene is.

A model that reads a scene (its caption, or its image tokens) as a bag of attributes answers "what colour is the
circle?" right when the circle is alone and, in a crowded scene, gives the colour of another object. So: exact match
per question type by the number of objects in the scene, and for the lookups (colour, shape, size or position of a
named object) the share of wrong answers that are that attribute of another object of the scene.
"""

from __future__ import annotations

from collections import defaultdict

from bench.data.world import CELLS
from bench.evaluate.accuracy import normalize

# question type -> the object field its answer is
LOOKUPS = {"colour": "colour", "shape": "shape", "size": "size", "position": "cell"}


def binding(qa: list[tuple[dict, dict]], answers: list[str]) -> dict[str, dict]:
    """``qa``: (scene record, question) pairs as the world stores them; ``answers``: the model's, in order. Returns
    ``{"by objects": {type: {n objects: exact match %}}, "wrong answers naming another object": {type: %}}``."""
    if len(qa) != len(answers):
        raise ValueError(f"binding: {len(qa)} questions but {len(answers)} answers")
    hits, other = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    for (record, q), a in zip(qa, answers):
        right = normalize(a) == normalize(q["answer"])
        hits[q["type"]][len(record["objects"])].append(right)
        if q["type"] in LOOKUPS and not right:
            key = LOOKUPS[q["type"]]
            values = {normalize(CELLS[o[key]] if key == "cell" else o[key]) for o in record["objects"]}
            other[q["type"]].append(normalize(a) in values)
    pct = lambda v: round(100 * sum(v) / len(v), 1)  # noqa: E731
    return {
        "by objects": {t: {str(n): pct(v) for n, v in sorted(by_n.items())} for t, by_n in sorted(hits.items())},
        "wrong answers naming another object": {t: pct(v) for t, v in sorted(other.items())},
    }


def run_questions(records: list[dict], ids: list[str]) -> list[tuple[dict, dict]]:
    """The (record, question) pairs of a run's per-question ids ("test-000012/q1": scene test-000012, question 1)."""
    by_id = {r["id"]: r for r in records}
    out = []
    for qid in ids:
        scene, _, q = qid.rpartition("/q")
        if scene not in by_id or not q.isdigit() or int(q) >= len(by_id[scene]["qa"]):
            raise ValueError(
                f"binding: question id {qid!r} is not a question of this world's split; was the run "
                f"made on another world (--world-resolution, world settings)?"
            )
        out.append((by_id[scene], by_id[scene]["qa"][int(q)]))
    return out
