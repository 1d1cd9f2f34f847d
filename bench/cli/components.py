"""``bench list``, ``bench tokens``, ``bench profile``, ``bench plan``: the registered parts and what a combination
costs."""

from __future__ import annotations

import argparse
import json

from bench.cli.common import (  # noqa: F401
    data_from_args,
    demo_images,
    parse_lora,
    specs_from_args,
    tiling_from_args,
    vlm_from_args,
    world_config,
)
from bench.cli.parser import FAMILIES
from connector_zoo.settings import SettingError


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

    from connector_zoo.model.vlm import VLM
    from connectors import build_connector
    from encoders import build_encoder
    from llms import build_llm

    anyres = None
    if args.tiling == "anyres":  # bad sizes or pinpoints fail before anything is built
        from encoders.anyres import parse_pinpoints, parse_sizes

        anyres = (parse_sizes(args.image_size), parse_pinpoints(args.grid_pinpoints) if args.grid_pinpoints else None)
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
        if anyres is not None:
            print_tiled(VLM(enc, conn, llm, tiling=tiling_from_args(args)).eval(), anyres[0], width)
    if anyres is not None:
        print_anyres(*anyres, enc.info)


def print_tiled(vlm, sizes: list[tuple[int, int]], width: int) -> None:
    """The visual tokens ``vlm`` (tiled) gives an image of each size, measured on a demo image of that size."""
    import torch

    from connector_zoo.model.vlm import VLMInputs

    cells = []
    for h, w in sizes:
        pixels, image_sizes = vlm.preprocess(demo_images(0, 1, (h, w)))
        with torch.no_grad():
            visual = vlm.visual_tokens(VLMInputs([torch.tensor([0])], pixel_values=pixels, image_sizes=image_sizes))
        cells.append(f"{h}x{w}: {int(visual.num_tokens[0]):,} ({pixels.shape[0]} views)")
    layout = "unpadded grid + newlines" if vlm.tiling.image_newline is not None else "views concatenated"
    print(f"{'':<{width}}   AnyRes, {layout}: " + "; ".join(cells))


def print_anyres(sizes: list[tuple[int, int]], pinpoints, info) -> None:
    """LLaVA-NeXT's AnyRes tokens per image size (encoders/anyres.py), for a projector that keeps every patch;
    ``pinpoints`` None: LLaVA-NeXT's, scaled to the encoder's input."""
    from encoders.anyres import DEFAULT_PINPOINTS, anyres_tokens, scaled_pinpoints

    tile, (side, side_w) = info.image_size, info.grid
    if side != side_w:
        raise ValueError(f"--tiling anyres needs a square patch grid; this encoder's is {side}x{side_w}")
    pinpoints = pinpoints or scaled_pinpoints(DEFAULT_PINPOINTS, tile)
    print(
        f"AnyRes (LLaVA-NeXT) at {tile} px, {side}x{side} patches a view, pinpoints "
        + ",".join(f"{h}x{w}" for h, w in pinpoints)
        + "; with a per-patch projector (linear, mlp2x_gelu; `bench run --tiling anyres` trains it):"
    )
    for h, w in sizes:
        t = anyres_tokens(h, w, pinpoints, tile, side)
        print(
            f"  {h}x{w}: {t['tiles']} tiles + the global view = {t['views']} views; {t['base']} (global) + "
            f"{t['grid']} (tiles, unpadded) + {t['newlines']} newlines = {t['total']} tokens "
            f"({t['total'] / (side * side):.2f}x one view)"
        )


def cmd_profile(args: argparse.Namespace) -> None:
    from bench.evaluate.profile import profile

    if args.keep is not None or "," in args.connector:
        return profile_comparison(args)
    shape = None
    if args.image_size:
        from encoders.anyres import parse_sizes

        (shape,) = parse_sizes(args.image_size)
    vlm = vlm_from_args(args)
    result = profile(vlm, demo_images(vlm.encoder.info.image_size, args.images, shape), repeats=args.repeats)
    tok, fl = result["visual_tokens_per_image"], result["flops"]
    tiled = ""
    if vlm.tiling is not None:
        size = f"{shape[0]}x{shape[1]}" if shape else f"{vlm.encoder.info.image_size} px square"
        tiled = f"; AnyRes, {result['views_per_image'][0]} views an image of {size}"
    print(
        f"{vlm.connector.spec['name']}: visual tokens/image {tok['mean']:.1f} (min {tok['min']}, max {tok['max']})"
        + tiled
    )
    print(f"  parameters: connector {result['parameters']['connector']:,}, total {result['parameters']['total']:,}")
    print(
        f"  FLOPs: encoder {fl['encoder']:,}, connector {fl['connector']:,}, LLM prefill {fl['llm_prefill']:,} "
        f"({result['prefill_tokens']} tokens)"
    )
    decode = result["decode_tokens_per_second"]
    print(
        f"  prefill latency (time to first token) {result['prefill_latency_ms']:.2f} ms; decode "
        f"{'n/a' if decode is None else f'{decode:.1f}'} tokens/s; peak memory "
        f"{result['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    if args.json:
        print(json.dumps(result, indent=1))


def profile_comparison(args: argparse.Namespace) -> None:
    """``bench profile --connector mlp2x_gelu,fastv,... --keep SHARE``: the prefill table of reducers at one share."""
    import torch

    from bench.evaluate.profile import prefill_comparison
    from bench.run.record import cpu_name
    from encoders import build_encoder
    from llms import build_llm

    if args.run:
        raise SettingError("bench profile: --keep / several connectors build fresh components; drop --run")
    if args.keep is None:
        raise SettingError(
            "bench profile: several connectors are compared at one share of the image tokens; give --keep"
        )
    if args.connector_arg:
        raise SettingError("bench profile --keep sets each reducer's share itself; drop --connector-arg")
    names = args.connector.split(",")
    specs = specs_from_args(args)
    enc, llm = build_encoder(**specs["encoder"]), build_llm(**specs["llm"])
    rows = prefill_comparison(
        enc,
        llm,
        names[1:],
        args.keep,
        demo_images(enc.info.image_size, 1)[0],
        repeats=args.repeats,
        fastv_layer=args.fastv_layer,
        projector=names[0],
    )
    layers = getattr(llm.model.config, "num_hidden_layers", "?")
    print(
        f"prefill at batch 1, one image: encoder {args.encoder} ({enc.checkpoint}, {enc.info.num_patches} patches), "
        f"LLM {args.llm} ({llm.checkpoint}: width {llm.hidden_size}, {layers} layers); keep {args.keep:g}; "
        f"connector + LLM prefill, median [min, max] of {args.repeats} interleaved rounds; "
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'connector':<14} {'tokens in':>9} {'after':>7} {'kept':>6} {'prefill ms':>11} {'[min, max]':>19} "
        f"{'speed-up':>8}"
    )
    for r in rows:
        spread = f"[{r['min_ms']:.1f}, {r['max_ms']:.1f}]"
        print(
            f"{r['connector']:<14} {r['tokens_in']:>9} {r['tokens_after']:>7.0f} {r['kept_share']:>6.1%} "
            f"{r['prefill_ms']:>11.1f} {spread:>19} {r['speedup']:>7.2f}x"
        )
    if args.json:
        print(json.dumps(rows, indent=1))


def cmd_plan(args: argparse.Namespace) -> None:
    from bench.train.plan import plan
    from bench.train.settings import RunConfig

    specs = specs_from_args(args)
    for family, default in (("encoder", "openai/clip-vit-large-patch14-336"), ("llm", "lmsys/vicuna-7b-v1.5")):
        specs[family]["checkpoint"] = specs[family]["checkpoint"] or default
    stages = RunConfig(recipe=args.recipe, lora=parse_lora(args.lora)).resolved_stages()
    if args.batch_size:
        for s in stages:
            s.batch_size = args.batch_size
    lora = parse_lora(args.lora)
    print(
        f"plan: {args.encoder} ({specs['encoder']['checkpoint']}) + {specs['connector']['name']} + {args.llm} "
        f"({specs['llm']['checkpoint']}), recipe {args.recipe}, {args.devices} devices"
    )
    tiling = tiling_from_args(args)
    for line in plan(specs, stages, args.devices, args.text_tokens, args.backbone_dtype, lora and lora["r"], tiling):
        print(line)
