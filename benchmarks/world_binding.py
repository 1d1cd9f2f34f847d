"""Do a mini-world VLM's answers bind attributes to objects? Per run, test answers split by scene crowding.

    python benchmarks/world_binding.py RUN_DIR [RUN_DIR ...]

Reads each run's recorded per-question test answers (``results.json``) and its world (``config.json``), and prints
``bench/evaluate/binding.py``'s split: exact match per question type by the number of objects in the scene, and
the share of wrong lookups (colour, shape, size, position of a named object) that name another object's attribute.
No model is run. docs/mini-world.md's section on the world's ceiling compares it with the world LLM reading captions
(``benchmarks/world_llm_text.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.data.world import World, WorldConfig
from bench.evaluate.binding import binding, run_questions
from connector_zoo.io import read_json


def run_binding(run: Path) -> dict:
    results, config = read_json(run / "results.json"), read_json(run / "config.json")
    if config.get("data", {}).get("kind") != "world":
        raise SystemExit(f"{run}: not a mini-world run (data kind {config.get('data', {}).get('kind')!r})")
    per_question = results["metrics"]["test"]["accuracy"].get("per_question")
    if not per_question:
        raise SystemExit(f"{run}/results.json has no per-question test answers (recorded since issue 13's statistics)")
    world = World(WorldConfig(**config["data"].get("world", {})), progress=False)
    qa = run_questions(world.records("test"), per_question["ids"])
    return binding(qa, per_question["answers"])


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__.splitlines()[2].strip())
    for arg in sys.argv[1:]:
        print(json.dumps({"run": arg, **run_binding(Path(arg))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
