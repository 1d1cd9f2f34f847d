"""A new batch shape every step: what it costs a packed training step of the pretrained world level on CPU.

    python benchmarks/shape_churn.py [--steps 16] [--multiples 1,64] [--qa-turns 7] [--train-questions 7]
                                     [--stage 2] [--threads 2]

``benchmarks/world_levers.py`` times one batch again and again; training never does. Each of its steps packs other
samples into one row of another width, and on CPU a new width is a new matrix shape for every linear layer of the LLM
(oneDNN builds a kernel per shape and keeps it in its primitive cache). This script takes ``--steps`` consecutive
training batches of the level (``--batch-size`` samples each, in the order a run would draw them), and for each batch
runs one forward and backward (bf16 autocast; the LLM trained in stage 2, frozen in stage 1) once per setting of
``VLM.pack_multiple`` (the packed row's width rounded up to that multiple; 1: exact), the settings in alternating
order from batch to batch. Printed per setting: median seconds a step over the batches after the first two, its
min-max spread, the ratio to the first setting, the distinct row widths it met, and the process's resident memory
after the last step (both settings share one process: read growth from ``--multiples`` with a single value). Print
only, nothing written.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from bench.run.record import cpu_name
from bench.train.assemble import build_model, feature_sources, load_data
from bench.train.settings import RunConfig
from connector_zoo.model.precision import autocast


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--multiples", default="1,64")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--qa-turns", type=int, default=7)
    ap.add_argument("--train-questions", type=int, default=7)
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2))
    ap.add_argument("--connector", default="mlp2x_gelu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = {"kind": "world", "qa_turns": args.qa_turns, "pretrain": {"llm_level": "smollm2"}}
    if args.train_questions:
        data["train_questions"] = args.train_questions
    cfg = RunConfig(connector={"name": args.connector}, data=data)
    train, _, _, world = load_data(cfg, lambda *a: None)
    vlm = build_model(cfg, world, print)
    _, collators, _ = feature_sources(cfg, vlm, [train], lambda *a: None)
    collate = collators[train.images.key]
    order = torch.randperm(len(train.samples), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [
        [train.samples[i] for i in order[b * args.batch_size : (b + 1) * args.batch_size]] for b in range(args.steps)
    ]
    vlm.llm.model.requires_grad_(args.stage == 2)
    vlm.connector.requires_grad_(True)
    multiples = [int(m) for m in args.multiples.split(",")]
    times: dict[int, list[float]] = {m: [] for m in multiples}
    widths: dict[int, set[int]] = {m: set() for m in multiples}
    rss_start = rss_gb()
    for i, samples in enumerate(batches):
        batch = collate(samples)
        batch.pack = True
        for m in multiples if i % 2 == 0 else multiples[::-1]:
            vlm.pack_multiple = m
            vlm.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with autocast("bf16"):
                loss = vlm(batch).loss
            loss.backward()
            times[m].append(time.perf_counter() - start)
            lengths = [len(ids) - 1 + vlm.connector.max_tokens(vlm.encoder.info) for ids in batch.input_ids]
            widths[m].add(vlm.pack_layout(lengths)[1])
    print(
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; stage {args.stage}, {args.steps} batches of "
        f"{args.batch_size} ({args.qa_turns} questions a conversation), each step once per setting in alternating "
        f"order; resident memory {rss_start:.2f} GB before the first step, {rss_gb():.2f} GB after the last"
    )
    first = statistics.median(times[multiples[0]][2:])
    rows = []
    for m, ts in times.items():
        med, rest = statistics.median(ts[2:]), ts[2:]
        rows.append(
            {
                "pack_multiple": m,
                "median_s": round(med, 3),
                "min_s": round(min(rest), 3),
                "max_s": round(max(rest), 3),
                "speed-up": round(first / med, 3),
                "widths": len(widths[m]),
            }
        )
        print(
            f"  pack_multiple {m:<4} {med:6.2f} s a step [{min(rest):.2f}, {max(rest):.2f}]  {first / med:5.2f}x  "
            f"{len(widths[m])} distinct widths"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
