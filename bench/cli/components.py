"""``bench list``, ``bench tokens``, ``bench profile``, ``bench plan``: the registered parts and what a combination
costs."""

from __future__ import annotations

import argparse
import json

from bench.cli.common import data_from_args, demo_images, parse_lora, specs_from_args, vlm_from_args, world_config  # noqa: F401
from bench.cli.parser import FAMILIES


def cmd_list(args: argparse.Namespace) -> None:
    import importlib

    for family, (module, attr) in FAMILIES.items():
        if args.family and args.family != family:
            continue
        registry = getattr(importlib.import_module(module), attr)
        print(f"{family} (entry-point group {registry.group})")
        for e in registry.entries():
            desc = f"ERROR: {e.error}" if e.error else e.description
            print(f"  {e.name:<14} {e.origin:<28} {desc}")


def cmd_tokens(args: argparse.Namespace) -> None:
    import torch

    from bench.model.vlm import VLM
    from connectors import build_connector
    from encoders import build_encoder
    from llms import build_llm

    specs = specs_from_args(args)
    enc = build_encoder(**specs["encoder"])
    llm = build_llm(**specs["llm"])
    images = demo_images(enc.info.image_size, args.images)
    pixel_values = enc.preprocess(images)
    print(
        f"encoder {args.encoder} ({enc.checkpoint}): grid {enc.info.grid[0]}x{enc.info.grid[1]} = "
        f"{enc.info.num_patches} patches, width {enc.info.hidden_size}; LLM {args.llm} width {llm.hidden_size}"
    )
    names = args.connector.split(",")
    width = max(16, *(len(n) + 1 for n in names))
    print(f"{'connector':<{width}} {'tokens/image (per image)':<32} {'params':>10}")
    for name in names:
        spec = specs_from_args(args, name)["connector"]
        torch.manual_seed(0)
        conn = build_connector(spec.pop("name"), enc.info.hidden_size, llm.hidden_size, **spec)
        vlm = VLM(enc, conn, llm).eval()
        with torch.no_grad():
            features = vlm.encode(pixel_values)
            note = ""
            if hasattr(conn, "calibrate"):  # an untrained router: set its budget offset on these images
                conn.calibrate(features)
                note = "  (untrained router; budget offset calibrated on these images)"
            counts = conn(features).num_tokens.tolist()
        mean = sum(counts) / len(counts)
        if getattr(conn, "adaptive", False):
            note = "  (adaptive: a count per image)"
        hook = getattr(conn, "llm_hook", None)
        if hook is not None and hasattr(hook, "keep_count"):
            note = f"  (enter the LLM; {hook.keep_count(counts[0])} after LLM layer {hook.layer})"
        print(f"{name:<{width}} {mean:<8.1f} {str(counts):<23} {conn.num_parameters():>10,}{note}")


def cmd_profile(args: argparse.Namespace) -> None:
    from bench.evaluate.profile import profile

    vlm = vlm_from_args(args)
    result = profile(vlm, demo_images(vlm.encoder.info.image_size, args.images), repeats=args.repeats)
    tok, fl = result["visual_tokens_per_image"], result["flops"]
    print(f"{vlm.connector.spec['name']}: visual tokens/image {tok['mean']:.1f} (min {tok['min']}, max {tok['max']})")
    print(f"  parameters: connector {result['parameters']['connector']:,}, total {result['parameters']['total']:,}")
    print(f"  FLOPs: connector {fl['connector']:,}, LLM prefill {fl['llm_prefill']:,} ({result['prefill_tokens']} "
          f"tokens)")  # fmt: skip
    decode = result["decode_tokens_per_second"]
    print(
        f"  prefill latency (time to first token) {result['prefill_latency_ms']:.2f} ms; decode "
        f"{'n/a' if decode is None else f'{decode:.1f}'} tokens/s; peak memory "
        f"{result['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    if args.json:
        print(json.dumps(result, indent=1))


def cmd_plan(args: argparse.Namespace) -> None:
    from bench.train.config import RunConfig
    from bench.train.plan import plan

    specs = specs_from_args(args)
    for family, default in (("encoder", "openai/clip-vit-large-patch14-336"), ("llm", "lmsys/vicuna-7b-v1.5")):
        specs[family]["checkpoint"] = specs[family]["checkpoint"] or default
    stages = RunConfig(recipe=args.recipe, lora=parse_lora(args.lora)).resolved_stages()
    if args.batch_size:
        for s in stages:
            s.batch_size = args.batch_size
    lora = parse_lora(args.lora)
    print(f"plan: {args.encoder} ({specs['encoder']['checkpoint']}) + {specs['connector']['name']} + {args.llm} "
          f"({specs['llm']['checkpoint']}), recipe {args.recipe}, {args.devices} devices")  # fmt: skip
    for line in plan(specs, stages, args.devices, args.text_tokens, args.backbone_dtype, lora and lora["r"]):
        print(line)
