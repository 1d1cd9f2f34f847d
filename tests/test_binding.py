"""bench/evaluate/binding.py: the crowded-scene split docs/mini-world.md's diagnosis of the world LLM rests on."""

from __future__ import annotations

import pytest

from bench.evaluate.binding import binding, run_questions


def test_binding_splits_by_object_count_and_names_the_wrong_objects_value():
    """Hand-made scenes: a lookup answered right on the one-object scene, with the other object's colour and with an
    absent colour on the two-object ones; a position answered with the other object's cell."""
    one = {"objects": [{"colour": "red", "shape": "circle", "size": "small", "cell": 0}]}
    two = {
        "objects": [
            {"colour": "red", "shape": "circle", "size": "small", "cell": 0},
            {"colour": "blue", "shape": "square", "size": "large", "cell": 8},
        ]
    }
    colour = lambda a: {"type": "colour", "question": "What colour is the circle?", "answer": a}  # noqa: E731
    where = {"type": "position", "question": "Where is the red circle?", "answer": "top left"}
    qa = [(one, colour("red")), (two, colour("red")), (two, colour("red")), (two, colour("red")), (two, where)]
    out = binding(qa, ["red", "Red.", "blue", "green", "bottom right"])
    assert out["by objects"] == {"colour": {"1": 100.0, "2": 33.3}, "position": {"2": 0.0}}
    # of the two wrong colours one is the square's ("blue"), one is in no object ("green"); the position is the square's
    assert out["wrong answers naming another object"] == {"colour": 50.0, "position": 100.0}


def test_run_questions_maps_ids_to_their_scene_and_question_and_refuses_another_worlds():
    records = [
        {"id": "test-000000", "qa": [{"question": "a"}, {"question": "b"}], "objects": []},
        {"id": "test-000001", "qa": [{"question": "c"}], "objects": []},
    ]
    pairs = run_questions(records, ["test-000001/q0", "test-000000/q1"])
    assert [(r["id"], q["question"]) for r, q in pairs] == [("test-000001", "c"), ("test-000000", "b")]
    for bad in ("test-000001/q1", "test-000009/q0", "test-000000"):
        with pytest.raises(ValueError, match="another world"):
            run_questions(records, [bad])
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        binding(pairs, ["x"])


def test_world_binding_reads_a_runs_recorded_answers_against_its_world(tmp_path):
    """benchmarks/world_binding.py on a run directory: the recorded answers (here: the truth for the first scene's
    questions, "wrong" for the rest) are split against the world named in the run's config."""
    import dataclasses
    import importlib.util
    import json
    from pathlib import Path

    from bench.data.world import World, WorldConfig

    cfg = WorldConfig().scaled(0.01)
    records = World(cfg, progress=False).records("test")
    ids = [f"{r['id']}/q{i}" for r in records[:2] for i in range(len(r["qa"]))]
    answers = [
        q["answer"] if i < len(records[0]["qa"]) else "wrong"
        for i, q in enumerate(q for r in records[:2] for q in r["qa"])
    ]
    (tmp_path / "config.json").write_text(json.dumps({"data": {"kind": "world", "world": dataclasses.asdict(cfg)}}))
    accuracy = {"per_question": {"ids": ids, "answers": answers, "correct": []}}
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"test": {"accuracy": accuracy}}}))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "world_binding.py"
    spec = importlib.util.spec_from_file_location("world_binding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.run_binding(tmp_path)
    assert out == binding(run_questions(records, ids), answers)
    scored = [(len(r["objects"]), q["type"]) for r in records[:2] for q in r["qa"]]
    for n, qtype in scored:
        right = [k < len(records[0]["qa"]) for k, (m, t) in enumerate(scored) if (m, t) == (n, qtype)]
        assert out["by objects"][qtype][str(n)] == round(100 * sum(right) / len(right), 1)
    (tmp_path / "config.json").write_text(json.dumps({"data": {"kind": "jsonl"}}))
    with pytest.raises(SystemExit, match="not a mini-world run"):
        module.run_binding(tmp_path)
