"""Helpers every command module shares: component specs from the options, the lmms/LoRA settings, demo images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.cli.parser import parse_settings


def parse_lora(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``--lora r=128,alpha=256,dropout=0.05,targets=q_proj+v_proj`` -> settings (an empty value: the defaults; a
    configuration file may give the mapping itself)."""
    if value is None:
        return None
    from llms.base import normalize_lora

    if isinstance(value, dict):
        return normalize_lora(dict(value))
    pairs = [p for p in value.split(",") if p.strip()]
    return normalize_lora(parse_settings(pairs))


def component_name(value: str | dict[str, Any]) -> str:
    """A component option's name: the option itself, or the ``name`` of the mapping a configuration file gave."""
    return value["name"] if isinstance(value, dict) else value


def specs_from_args(args: argparse.Namespace, connector: str | None = None) -> dict[str, dict[str, Any]]:
    """The three component specs; an option a configuration file gave as a mapping (``{name: ..., settings}``) is the
    spec, with the checkpoint, layer and ``--connector-arg`` options laid over it."""

    def spec(value, **options) -> dict[str, Any]:
        base = dict(value) if isinstance(value, dict) else {"name": value}
        return {**base, **{k: v for k, v in options.items() if v is not None or k not in base}}

    return {
        "encoder": spec(args.encoder, checkpoint=args.encoder_checkpoint, layer=args.layer),
        "connector": {**spec(connector or args.connector), **parse_settings(args.connector_arg)},
        "llm": spec(args.llm, checkpoint=args.llm_checkpoint),
    }


def tiling_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The tiling spec of ``--tiling`` / ``--grid-pinpoints`` (a configuration file may give the whole spec)."""
    value = getattr(args, "tiling", None)
    if isinstance(value, dict):
        return value
    if value in (None, "none"):
        for flag in ("grid_pinpoints", "max_tiles"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} is an AnyRes setting: give --tiling anyres with it")
        return None
    spec: dict[str, Any] = {"name": value}
    if getattr(args, "grid_pinpoints", None):
        from encoders.anyres import parse_pinpoints

        spec["grid_pinpoints"] = [list(p) for p in parse_pinpoints(args.grid_pinpoints)]
    if getattr(args, "max_tiles", None):
        spec["max_tiles"] = args.max_tiles
    return spec


def load_run(run_dir: str | Path, args: argparse.Namespace, weights: bool = True):
    """The one loader of a run directory for every command (generate, eval, profile, prune-curve, export-hf,
    save-pretrained): its ``config.json`` checked first (one line when it is not a run config), then the model
    (``VLM.load``: verified against the manifest unless ``--no-verify``; dotted paths only with
    ``--allow-dotted-paths``). A model directory without a run config (``VLM.save``, ``<run>/hf``) loads as it is."""
    from bench.train.settings import RunConfig
    from connector_zoo.model.vlm import CONFIG_NAME, VLM

    run_dir = Path(run_dir)
    if (run_dir / CONFIG_NAME).exists() and (run_dir / "config.json").exists():
        RunConfig.from_file(run_dir / "config.json")
    verify = not getattr(args, "no_verify", False)
    return VLM.load(run_dir, getattr(args, "allow_dotted_paths", False), verify=verify, weights=weights).eval()


def vlm_from_args(args: argparse.Namespace):
    """A trained run (``--run``) or a fresh combination from the component options (seeded)."""
    import torch

    from connector_zoo.model.vlm import VLM

    if args.run:
        return load_run(args.run, args)
    s = specs_from_args(args)
    torch.manual_seed(0)
    return VLM.build(s["encoder"], s["connector"], s["llm"], tiling=tiling_from_args(args))


def world_config(args: argparse.Namespace):
    """The mini world asked for by ``--world-scale`` and ``--world-resolution``; None for the default world."""
    from bench.data.world import WorldConfig

    resolution = getattr(args, "world_resolution", None)
    object_scale = getattr(args, "world_object_scale", None) or 1.0
    if args.world_scale == 1.0 and resolution in (None, 64) and object_scale == 1.0:
        return None
    world = WorldConfig(image_size=resolution or 64, object_scale=object_scale)
    return world.scaled(args.world_scale) if args.world_scale != 1.0 else world


#: what a mini world LLM level sets when neither the command line nor a configuration file does: the pretrained
#: level's recipe trains on 7 fresh questions an image, asked as branches (docs/pretrained-world.md, run B)
LEVEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "smollm2": {"recipe": "mini-smollm2", "qa_turns": 7, "train_questions": 7, "qa_branches": True},
}
#: the same settings' defaults at the other levels
PLAIN_DEFAULTS: dict[str, Any] = {"recipe": "mini", "qa_turns": 1, "train_questions": None, "qa_branches": False}


def level_default(args: argparse.Namespace, key: str) -> Any:
    """The default of a PLAIN_DEFAULTS setting at ``args``' ``--world-llm`` level (LEVEL_DEFAULTS, else the plain)."""
    return LEVEL_DEFAULTS.get(getattr(args, "world_llm", None) or "", {}).get(key, PLAIN_DEFAULTS[key])


def apply_level_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the settings of PLAIN_DEFAULTS that ``args`` leaves unset (None) with ``--world-llm``'s LEVEL_DEFAULTS or
    the plain ones; idempotent. ``--qa-branches`` defaults on only where there is more than one question to branch."""
    branches_unset = getattr(args, "qa_branches", False) is None
    for key, plain in PLAIN_DEFAULTS.items():
        if getattr(args, key, plain) is None:
            setattr(args, key, level_default(args, key))
    if branches_unset and (getattr(args, "qa_turns", 1) or 1) == 1:
        args.qa_branches = False
    return args


def data_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``data`` part of a run config from ``--data``, ``--data-path``, ``--image-folder``, ``--world-scale``; when a
    configuration file gave ``data`` as a mapping, that mapping with the data options set beside it laid over."""
    apply_level_defaults(args)
    if isinstance(args.data, dict):
        return data_over_file(args)
    data: dict[str, Any] = {"kind": args.data}
    if args.data == "world":
        world = world_config(args)
        if world is not None:
            data["world"] = world.as_dict()
        if getattr(args, "qa_turns", 1) > 1:
            data["qa_turns"] = args.qa_turns
        if getattr(args, "train_questions", None) is not None:
            data["train_questions"] = args.train_questions
        if getattr(args, "qa_branches", None):
            data["qa_branches"] = True
    else:
        if not args.data_path:
            raise ValueError(f"--data {args.data} needs --data-path (a LLaVA JSON file or a local HF dataset)")
        data.update(path=args.data_path, image_folder=args.image_folder)
        if getattr(args, "held_out", None) is not None:
            data["held_out"] = args.held_out
    pre = pretrain_from_args(args)
    if pre:
        data["pretrain"] = pre
    return data


def data_over_file(args: argparse.Namespace) -> dict[str, Any]:
    """A configuration file's ``data`` mapping with the data options given beside it (on the command line or as
    keys of the file) laid over."""
    import copy

    data = copy.deepcopy(args.data)
    data.setdefault("kind", "world")
    set_here = (getattr(args, "given", set()) | getattr(args, "from_file", set())) - {"data"}
    if set_here & {"world_scale", "world_resolution", "world_object_scale"}:
        world = world_config(args)
        if world is None:  # the default world
            data.pop("world", None)
        else:
            data["world"] = world.as_dict()
    for option, key in (
        ("qa_turns", "qa_turns"),
        ("train_questions", "train_questions"),
        ("qa_branches", "qa_branches"),
        ("data_path", "path"),
        ("image_folder", "image_folder"),
    ):
        if option in set_here:
            data[key] = getattr(args, option)
    if "held_out" in set_here:
        data["held_out"] = args.held_out
    if set_here & {"pretrain_steps", "world_llm", "world_encoder_px", "world_encoder_recolour"}:
        data["pretrain"] = {**data.get("pretrain", {}), **pretrain_from_args(args)}
    return data


def pretrain_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The mini world's ``data.pretrain`` from ``--pretrain-steps`` and ``--world-llm`` (empty: the defaults)."""
    pre: dict[str, Any] = {}
    if getattr(args, "pretrain_steps", None) is not None:
        pre.update(encoder_steps=args.pretrain_steps, llm_steps=args.pretrain_steps)
    if getattr(args, "world_llm", "small") != "small":
        pre["llm_level"] = args.world_llm
    if getattr(args, "world_encoder_px", None):
        pre["encoder_px"] = args.world_encoder_px
    if getattr(args, "world_encoder_recolour", None) is not None:
        pre["encoder_recolour"] = args.world_encoder_recolour
    return pre


def demo_images(size: int, n: int, shape: tuple[int, int] | None = None):
    """A few images of different content (flat, stripes, checkerboard, noise) for token-count reports: ``size``
    pixels square, or ``shape`` (height, width)."""
    import numpy as np
    from PIL import Image

    h, w = shape or (size, size)
    rng = np.random.default_rng(0)
    kinds = [
        np.full((h, w, 3), 128, np.uint8),
        np.repeat((np.arange(w) // max(1, w // 8) % 2 * 255).astype(np.uint8)[None, :, None], h, 0).repeat(3, 2),
        ((np.add.outer(np.arange(h) // 4, np.arange(w) // 4) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2),
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
    ]
    return [Image.fromarray(kinds[i % len(kinds)]) for i in range(n)]


def report(runs, out: Path, html: Path | None = None, per_type: int = 4) -> None:
    """Tables and plots of finished runs, printed and written to ``out``; with ``html``, the page too. Without
    matplotlib (the ``report`` extra) the tables are written and the plots skipped with a line saying so; the HTML page
    (its figures are plots) is refused before anything is written."""
    from bench.report.plots import PLOTS_NEED, have_matplotlib, pareto_plots
    from bench.report.tables import write_reports

    plots = have_matplotlib()
    if html is not None and not plots:
        raise ValueError(f"--html: the page's {PLOTS_NEED}")
    written = write_reports(runs, out)
    print(written["markdown"].read_text())
    paths = [*written.values(), *(pareto_plots(runs, out) if plots else [])]
    if html is not None:
        from bench.report.html import write_html

        paths.append(write_html(runs, html, per_type=per_type))
    for path in paths:
        print(f"wrote {path}")
    if not plots:
        print(f"plots skipped ({PLOTS_NEED})")
