"""What each cost lever of the pretrained world level (``--world-llm smollm2``) buys: one training step (forward and
backward) of the composed model on the same batch of the world's training samples, per setting, timed in interleaved
rounds (each round times every setting once, in turn), median and spread (min-max) per setting and the ratio to the
first. Also the tokens per sample with SmolLM2's default system turn and without it (what the level renders).

    python benchmarks/world_levers.py [--rounds 5] [--batch-size 16] [--qa-turns 3] [--connector mlp2x_gelu]
                                       [--only bf16]

Settings: the LLM trained whole (stage 2) or frozen (stage 1, the connector still gets gradients through it), LoRA
r=64 on every linear layer, fp32 or bf16 autocast, the LM head on every position (transformers' loss) or only where
a label is (llms/loss.py), and the batch padded to its longest sample or packed into one row (``--packing on``).
The padding share of the batch is printed. The world LLM is the level's (built on first use, minutes). Print only,
nothing written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.run.record import cpu_name
from bench.train.assemble import build_model, feature_sources, load_data
from bench.train.settings import RunConfig
from bench.train.world_llm import SMOLLM_DEFAULT_SYSTEM
from connector_zoo.model.precision import autocast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--qa-turns", type=int, default=3)
    ap.add_argument("--connector", default="mlp2x_gelu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="only the settings whose name contains this (e.g. bf16, head at labels)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = RunConfig(
        connector={"name": args.connector},
        data={"kind": "world", "qa_turns": args.qa_turns, "pretrain": {"llm_level": "smollm2"}},
    )
    train, _, _, world = load_data(cfg, lambda *a: None)
    vlm = build_model(cfg, world, print)
    _, collators, _ = feature_sources(cfg, vlm, [train], lambda *a: None)
    collate = collators[train.images.key]
    samples = train.samples[: args.batch_size * 4 : 4]
    batch = collate(samples)  # captions and question conversations, as a training batch mixes them
    visual = vlm.connector.max_tokens(vlm.encoder.info)

    def tokens(template: str) -> float:
        """Mean tokens a sample (text as the template renders it, plus the visual tokens)."""
        saved, vlm.llm.tokenizer.chat_template = vlm.llm.tokenizer.chat_template, template
        try:
            return statistics.fmean(len(vlm.llm.encode_conversation(s.messages).input_ids) + visual for s in samples)
        finally:
            vlm.llm.tokenizer.chat_template = saved

    template = vlm.llm.tokenizer.chat_template
    with_system = template.replace(
        "{% for message in messages %}", "{% for message in messages %}" + SMOLLM_DEFAULT_SYSTEM, 1
    )
    rendered, longer = tokens(template), tokens(with_system)

    lora_added = False

    def step(trains_llm: bool, lora: bool, precision: str, full_logits: bool, packed: bool = False) -> float:
        nonlocal lora_added
        if lora and not lora_added:
            vlm.llm.add_lora({"r": 64, "alpha": 128, "dropout": 0.0})
            lora_added = True
        model = vlm.llm.model
        if lora_added:  # adapters on or off
            lora_model = model.base_model  # peft's LoraModel
            (lora_model.enable_adapter_layers if lora else lora_model.disable_adapter_layers)()
        model.requires_grad_(False)
        if trains_llm:
            for name, p in model.named_parameters():
                p.requires_grad_(("lora_" in name) if lora else "lora_" not in name)
        vlm.connector.requires_grad_(True)
        vlm.zero_grad(set_to_none=True)
        start = time.perf_counter()
        batch.pack = packed  # one row of all the samples, attention per sample (llms/attention.py), no padding
        with autocast(precision):
            loss = vlm(batch, full_logits=full_logits).loss
        loss.backward()
        return time.perf_counter() - start

    settings = {
        "LLM trained, fp32, head on every position": (True, False, "no", True),
        "LLM trained, fp32, head at labels": (True, False, "no", False),
        "LLM trained, bf16, head at labels": (True, False, "bf16", False),
        "LLM frozen (stage 1), bf16, head at labels": (False, False, "bf16", False),
        "LoRA r=64, bf16, head at labels": (True, True, "bf16", False),
        "LLM trained, bf16, head at labels, packed": (True, False, "bf16", False, True),
    }
    settings = {k: v for k, v in settings.items() if args.only is None or args.only in k}
    times: dict[str, list[float]] = {k: [] for k in settings}
    for s in settings.values():  # warm-up, untimed
        step(*s)
    for _ in range(args.rounds):
        for k, s in settings.items():
            times[k].append(step(*s))
    first = statistics.median(next(iter(times.values())))
    lengths = [len(ids) - 1 + visual for ids in batch.input_ids]  # <image> becomes the visual tokens
    padding = 1 - sum(lengths) / (len(lengths) * max(lengths))
    print(
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; batch {len(samples)} samples, {rendered:.1f} "
        f"tokens a sample with its {visual} visual tokens ({longer:.1f} with SmolLM2's default system turn); "
        f"{args.rounds} interleaved rounds; padded to the longest sample, {padding:.1%} of the batch is padding"
    )
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "setting": k,
                "median_s": round(med, 3),
                "min_s": round(min(ts), 3),
                "max_s": round(max(ts), 3),
                "speed-up": round(first / med, 2),
            }
        )
        print(f"  {k:<46} {med:7.2f} s  [{min(ts):.2f}, {max(ts):.2f}]  {first / med:5.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
