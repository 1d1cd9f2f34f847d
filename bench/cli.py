"""The ``bench`` command.

    bench list                         the registered encoders, connectors and LLM backends, with their origin
    bench tokens --encoder-checkpoint tiny-24 --connector mlp2x_gelu,qformer
                                       visual tokens per image and parameters for each connector
    bench export-hf --out DIR          write a transformers LlavaForConditionalGeneration directory

Bad input (an unknown name, a missing file, a checkpoint of the wrong shape) prints one actionable line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from connector_zoo.registry import RegistryError

FAMILIES = {"encoders": ("encoders", "ENCODERS"), "connectors": ("connectors", "CONNECTORS"), "llms": ("llms", "LLMS")}


def parse_value(text: str) -> Any:
    """``--connector-arg keep=0.25`` -> 0.25; JSON where it parses, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {pair!r} must look like key=value (e.g. --connector-arg num_queries=32)")
        out[key.replace("-", "_")] = parse_value(value)
    return out


def add_component_args(p: argparse.ArgumentParser, connector_default: str | None = "mlp2x_gelu") -> None:
    g = p.add_argument_group("components")
    g.add_argument("--encoder", default="clip", help="encoder name or dotted path (default: clip)")
    g.add_argument("--encoder-checkpoint", help="preset (tiny, tiny-24), hub id or local directory")
    g.add_argument("--layer", type=int, help="encoder layer, transformers hidden_states index (default -2)")
    g.add_argument("--connector", default=connector_default, help="connector name(s) or dotted path")
    g.add_argument("--connector-arg", action="append", metavar="KEY=VALUE", help="connector setting (repeatable)")
    g.add_argument("--llm", default="vicuna", help="LLM backend name or dotted path (default: vicuna)")
    g.add_argument("--llm-checkpoint", help="preset (tiny), hub id or local directory")


def specs_from_args(args: argparse.Namespace, connector: str | None = None) -> dict[str, dict[str, Any]]:
    return {
        "encoder": {"name": args.encoder, "checkpoint": args.encoder_checkpoint, "layer": args.layer},
        "connector": {"name": connector or args.connector, **parse_settings(args.connector_arg)},
        "llm": {"name": args.llm, "checkpoint": args.llm_checkpoint},
    }


# ------------------------------------------------------------------ commands
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

    from bench.vlm import VLM
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
    print(f"{'connector':<16} {'tokens/image (per image)':<32} {'params':>10}")
    for name in args.connector.split(","):
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
        print(f"{name:<16} {mean:<8.1f} {str(counts):<23} {conn.num_parameters():>10,}{note}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from bench.export import export_hf
    from bench.vlm import VLM

    if args.run:
        vlm = VLM.load(args.run)
    else:
        s = specs_from_args(args)
        vlm = VLM.build(s["encoder"], s["connector"], s["llm"])
    out = export_hf(vlm.eval(), args.out)
    print(
        f"wrote LlavaForConditionalGeneration to {out} (load with LlavaForConditionalGeneration.from_pretrained "
        f"and AutoProcessor.from_pretrained)"
    )


def demo_images(size: int, n: int):
    """A few images of different content (flat, stripes, checkerboard, noise) for token-count reports."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    kinds = [
        np.full((size, size, 3), 128, np.uint8),
        np.repeat((np.arange(size) // max(1, size // 8) % 2 * 255).astype(np.uint8)[None, :, None], size, 0).repeat(
            3, 2
        ),
        ((np.add.outer(np.arange(size) // 4, np.arange(size) // 4) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2),
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
    ]
    return [Image.fromarray(kinds[i % len(kinds)]) for i in range(n)]


# --------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="connector-zoo: train and benchmark VLM connectors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered encoders, connectors and LLM backends")
    p.add_argument("family", nargs="?", choices=sorted(FAMILIES))
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("tokens", help="visual tokens per image and parameter count of connectors")
    add_component_args(p, connector_default="linear,mlp2x_gelu")
    p.add_argument("--images", type=int, default=4, help="number of demo images (flat, stripes, checker, noise)")
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("export-hf", help="write a transformers LlavaForConditionalGeneration directory")
    add_component_args(p)
    p.add_argument("--run", help="a run directory (vlm_config.json + trainable.safetensors) to export")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export_hf)
    return parser


USER_ERRORS: tuple[type[BaseException], ...] = (RegistryError, ValueError, OSError, KeyError, TypeError)


def main(argv: list[str] | None = None, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except errors as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"bench {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
