"""What a mini-world LLM can answer from text alone: each test question after its scene's caption, greedy.

    python benchmarks/world_llm_text.py [--llm tinyllama] [--level wide] [--test 600] [--world-resolution 64]

The world's LLM at ``--level`` (built on first use, like ``bench run --world-llm``) answers every question of the
first ``--test`` test scenes twice: after the scene's caption ("caption\\nquestion", the form the ``wide`` level is
trained on, never with a test caption) and from the question alone (the blind baseline's view). Printed: exact
match per question type for both. A question type the LLM cannot answer from a perfect description of the scene it
will not answer from image tokens either; the table on the world's ceiling in docs/mini-world.md was measured with
this script.

Also printed, for the caption view, ``bench/evaluate/binding.py``: exact match per type by the number of objects
in the scene, and the share of wrong lookups that name another object's attribute (a bag-of-words reader).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from bench.data.world import World, WorldConfig
from bench.evaluate.accuracy import normalize
from bench.evaluate.binding import binding
from bench.train.world_llm import LEVELS, pretrain_llm
from llms import build_llm


@torch.no_grad()
def greedy(backend, prompts: list[str], max_new_tokens: int = 6, batch_size: int = 64) -> list[str]:
    """Greedy answers to single user turns, batched by prompt length (no padding, so no position to correct)."""
    model = backend.model
    model.eval()
    ids = [backend.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    by_length = defaultdict(list)
    for i, s in enumerate(ids):
        by_length[len(s)].append(i)
    out: list[str] = [""] * len(prompts)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            batch = torch.tensor([ids[i] for i in rows])
            gen = model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=backend.pad_token_id,
                eos_token_id=backend.eos_token_id,
            )
            for i, g in zip(rows, gen):
                out[i] = backend.tokenizer.decode(g[batch.shape[1] :], skip_special_tokens=True)
    return out


def score(world: World, backend, n: int) -> dict[str, dict]:
    """Exact match per type, with the caption and from the question alone; and the caption view's ``binding``."""
    records = world.records("test")[:n]
    qa = [(r, q) for r in records for q in r["qa"]]
    out = {}
    for view, prompts in (
        ("with caption", [f"{r['caption']}\n{q['question']}" for r, q in qa]),
        ("question alone", [q["question"] for _, q in qa]),
    ):
        hits, answers = defaultdict(list), greedy(backend, prompts)
        for (_, q), a in zip(qa, answers):
            hits[q["type"]].append(normalize(a) == normalize(q["answer"]))
            hits["all"].append(hits[q["type"]][-1])
        out[view] = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}
        if view == "with caption":
            out["with caption, binding"] = binding(qa, answers)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="tinyllama")
    ap.add_argument("--level", default="wide", choices=sorted(LEVELS))
    ap.add_argument("--test", type=int, default=600, help="test scenes (3 questions each)")
    ap.add_argument("--world-resolution", type=int, default=64)
    args = ap.parse_args()
    started = time.time()
    world = World(WorldConfig(image_size=args.world_resolution), progress=False)
    checkpoint = pretrain_llm(args.llm, world, level=args.level)
    backend = build_llm(args.llm, checkpoint=str(checkpoint))
    print(
        json.dumps(
            {
                "llm": args.llm,
                "level": args.level,
                "checkpoint": checkpoint.name,
                "test_scenes": args.test,
                "exact_match": score(world, backend, args.test),
                "seconds": round(time.time() - started),
            }
        )
    )


if __name__ == "__main__":
    main()
