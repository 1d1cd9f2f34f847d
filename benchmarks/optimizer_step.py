"""One optimizer step (gradient clipping, AdamW, ``zero_grad``) over an LLM's parameters: torch's default AdamW on a
CPU (a loop over the parameters), its ``foreach`` variant, and the fused kernel that ``bench.train.trainer.adamw``
picks.

    python benchmarks/optimizer_step.py [--rounds 3] [--reps 5] [--layers 30]

The parameters are SmolLM2-135M's shapes (transformers' ``LlamaConfig``, random weights; ``--layers`` cuts the depth),
the gradients random. Each round times ``--reps`` steps of each variant after one warm-up step, the variants
interleaved; printed: median [min, max] seconds a step, and the fused variant's speed-up over the default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VARIANTS = {"default (loop)": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def step_seconds(params: list[torch.nn.Parameter], options: dict, reps: int) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **options)
    out = []
    for i in range(reps + 1):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if i:  # the first step allocates the moments
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    params = list(LlamaForCausalLM(cfg).parameters())
    print(
        f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.rounds):
        for name, options in VARIANTS.items():
            times[name] += step_seconds(params, options, args.reps)
    for name, t in times.items():
        print(f"{name:<16} {statistics.median(t):.3f} s a step [{min(t):.3f}, {max(t):.3f}]")
    base, fused = statistics.median(times["default (loop)"]), statistics.median(times["fused"])
    print(f"fused against the default: {base / fused:.2f}x")


if __name__ == "__main__":
    main()
