"""Training steps of a SmolLM2-shaped LLM under glibc's default malloc and under ``keep_freed_memory`` (freed memory
kept by the process instead of returned to the kernel and faulted in again at the next step).

    python benchmarks/malloc_step.py [--rounds 3] [--steps 4] [--layers 30] [--batch-size 16] [--tokens 100]

Each setting runs in a fresh process (malloc's settings hold from the process start), the settings interleaved in
rounds. One step: forward under bf16 autocast, the LM head at a third of the positions (as the harness's label-only
loss), backward, gradient clipping, fused AdamW, ``zero_grad``; after two warm-up steps, ``--steps`` are timed.
Printed per setting: median [min, max] seconds a step, minor page faults a step, peak RSS; and the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = ("glibc default", "keep_freed_memory")


def child(setting: str, layers: int, steps: int, batch: int, tokens: int) -> dict:
    if setting == "keep_freed_memory":
        import os

        from connector_zoo.io import keep_freed_memory

        os.environ["CONNECTOR_ZOO_MALLOC"] = "keep"
        assert keep_freed_memory()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens))
    labelled = torch.rand(batch, tokens) < 1 / 3
    times, faults = [], []
    for i in range(steps + 2):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids).last_hidden_state
            logits = model.lm_head(hidden[labelled]).float()
        loss = torch.nn.functional.cross_entropy(logits, ids[labelled])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": times, "faults": faults, "peak_rss_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.layers, args.steps, args.batch_size, args.tokens)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return
    from bench.run.record import cpu_name

    got: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            flags = ["--layers", str(args.layers), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            flags += ["--tokens", str(args.tokens), "--child", setting]
            out = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True)
            got[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"CPU: {cpu_name()}; {args.layers} layers, batch {args.batch_size} x {args.tokens} tokens, bf16 autocast; "
        f"{args.rounds} rounds of {args.steps} timed steps a process"
    )
    med = {}
    for setting, runs in got.items():
        secs = [t for r in runs for t in r["seconds"]]
        faults = statistics.median(f for r in runs for f in r["faults"])
        peak = max(r["peak_rss_bytes"] for r in runs) / 2**30
        med[setting] = statistics.median(secs)
        print(
            f"  {setting:<18} {med[setting]:.3f} s a step [{min(secs):.3f}, {max(secs):.3f}]  "
            f"{faults:,.0f} page faults a step  peak RSS {peak:.2f} GiB"
        )
    print(f"  keep_freed_memory against the default: {med['glibc default'] / med['keep_freed_memory']:.2f}x")


if __name__ == "__main__":
    main()
