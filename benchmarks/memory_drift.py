"""Does a training process of the pretrained world level grow, and does its step slow as it grows?

    python benchmarks/memory_drift.py [--steps 60] [--stage 1] [--settings default,trim,arena2,multiple64]
                                      [--rounds 1] [--threads 2]

A run of the level grew from 5.2 to 10.6 GB of resident memory over its stage 2 (ps, December 7; its records'
peak memory rose ~20 MB a step in both stages) while its steps slowed from 11.0 to 11.9 s. This script trains
``--steps`` consecutive batches of the level (its data, model and settings: packed rows of 7 questions an image,
bf16 autocast, fused AdamW with clipping as the Trainer steps, the LLM trained in stage 2 and frozen in stage 1)
once per setting, each setting in a fresh process (malloc's settings hold from a process's start), the settings in
turn, ``--rounds`` times:

- ``default``: as ``bench run`` trains;
- ``trim``: glibc's ``malloc_trim(0)`` after every step (free heap pages handed back to the kernel);
- ``arena2``: ``MALLOC_ARENA_MAX=2`` (fewer malloc arenas for the threads to spread their frees over);
- ``multiple64``: packed rows rounded up to a multiple of 64 tokens (``VLM.pack_multiple``: fewer distinct shapes);
- ``onednn0``: ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` (oneDNN keeps no kernel per shape). Under bf16 autocast a
  ``Linear(576, 1536)`` alone, forward and backward at 150 row counts (800, 807, ...), grew the process by 724 MB
  with oneDNN's default cache (1,024 primitives) and 219 MB with none, 322 and 153 MB after ``malloc_trim``; at one
  row count, 40 MB (Intel Xeon with AVX-512 BF16, no AMX, 1 thread, December 7; a one-off script, not this one).

Printed per setting: the resident memory (``/proc/self/statm``) after the first steps and at the end, its growth a
step (least squares over the steps after the fifth), the median step and its growth a step. Prints only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = ("default", "trim", "arena2", "multiple64", "onednn0")
ENV = {"arena2": {"MALLOC_ARENA_MAX": "2"}, "onednn0": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}}  # from process start


def slope(values: list[float]) -> float:
    """Least-squares growth of ``values`` per index."""
    n = len(values)
    mx, my = (n - 1) / 2, statistics.fmean(values)
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / max(sum((i - mx) ** 2 for i in range(n)), 1e-12)


def child(setting: str, steps: int, stage: int, threads: int) -> dict:
    import resource

    import torch

    from bench.train.assemble import build_model, feature_sources, load_data
    from bench.train.settings import RunConfig
    from connector_zoo.model.precision import autocast

    torch.set_num_threads(threads)
    data = {
        "kind": "world",
        "qa_turns": 7,
        "train_questions": 7,
        "qa_branches": True,
        "pretrain": {"llm_level": "smollm2"},
    }
    cfg = RunConfig(connector={"name": "mlp2x_gelu"}, data=data)
    train, _, _, world = load_data(cfg, lambda *a: None)
    torch.manual_seed(0)
    vlm = build_model(cfg, world, lambda *a: None)
    _, collators, _ = feature_sources(cfg, vlm, [train], lambda *a: None)
    collate = collators[train.images.key]
    vlm.llm.model.requires_grad_(stage == 2)
    vlm.connector.requires_grad_(True)
    vlm.pack_multiple = 64 if setting == "multiple64" else 1
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    libc = ctypes.CDLL("libc.so.6")
    order = torch.randperm(len(train.samples), generator=torch.Generator().manual_seed(0)).tolist()
    page = resource.getpagesize()
    rss, seconds = [], []
    vlm.train()
    for step in range(steps):
        batch = collate([train.samples[i] for i in order[step * 16 : (step + 1) * 16]])
        batch.pack = True
        start = time.perf_counter()
        with autocast("bf16"):
            loss = vlm(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if setting == "trim":
            libc.malloc_trim(0)
        seconds.append(time.perf_counter() - start)
        with open("/proc/self/statm") as f:
            rss.append(int(f.read().split()[1]) * page / 1e9)
    return {"setting": setting, "rss": rss, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.stage, args.threads)))
        return 0
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        sys.exit(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    from bench.run.record import cpu_name

    results: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for s in settings:
            env = dict(os.environ, **ENV.get(s, {}))
            cmd = [sys.executable, __file__, "--child", s, "--steps", str(args.steps), "--stage", str(args.stage)]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results[s].append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"CPU: {cpu_name()}, {args.threads} threads; stage {args.stage}, {args.steps} steps of 16, rounds {args.rounds}"
    )
    for s, runs in results.items():
        for r in runs:
            rss, sec = r["rss"], r["seconds"]
            print(
                f"  {s:<11} RSS {rss[4]:.2f} -> {rss[-1]:.2f} GB ({1000 * slope(rss[5:]):+.1f} MB a step); step median "
                f"{statistics.median(sec[5:]):.2f} s ({1000 * slope(sec[5:]):+.1f} ms a step)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
