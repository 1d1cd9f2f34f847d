"""Prompt, visual and scoring of the mini-world task (the normalisation is ``bench.evaluate.accuracy.normalize``)."""

from __future__ import annotations

from bench.evaluate.accuracy import normalize

TYPES = ("colour", "count", "exist", "position", "relation", "shape", "size")


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    score = float(normalize(doc["answer"]) == normalize(results[0]))
    out = {"exact_match": score}
    out.update({f"exact_match_{t}": {"type": doc["type"], "score": score} for t in TYPES})
    return out


def mean(scores):
    return sum(scores) / max(len(scores), 1)


def _of(kind):
    def aggregate(items):
        scores = [i["score"] for i in items if i["type"] == kind]
        return sum(scores) / len(scores) if scores else float("nan")

    aggregate.__name__ = kind
    return aggregate


colour, count, exist, position, relation, shape, size = (_of(t) for t in TYPES)
