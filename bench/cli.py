"""The ``bench`` command.

    bench list                         the registered encoders, connectors and LLM backends, with their origin
    bench tokens --encoder-checkpoint tiny-24 --connector mlp2x_gelu,qformer
                                       visual tokens per image and parameters for each connector
    bench export-hf --out DIR          write a transformers LlavaForConditionalGeneration directory

Bad input (an unknown name, a missing file, a checkpoint of the wrong shape) prints one actionable line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.parser import FAMILIES, build_parser, limit, parse_settings
from connector_zoo.io import write_json
from connector_zoo.registry import RegistryError


def parse_lora(text: str | None) -> dict[str, Any] | None:
    """``--lora r=128,alpha=256,dropout=0.05,targets=q_proj+v_proj`` -> settings (an empty value: the defaults)."""
    if text is None:
        return None
    from llms.base import normalize_lora

    pairs = [p for p in text.split(",") if p.strip()]
    return normalize_lora(parse_settings(pairs))


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


def vlm_from_args(args: argparse.Namespace):
    """A trained run (``--run``) or a fresh combination from the component options (seeded)."""
    import torch

    from bench.vlm import VLM

    if args.run:
        return VLM.load(args.run, allow_dotted_paths=args.allow_dotted_paths, verify=not args.no_verify)
    s = specs_from_args(args)
    torch.manual_seed(0)
    return VLM.build(s["encoder"], s["connector"], s["llm"])


def cmd_export_hf(args: argparse.Namespace) -> None:
    from bench.export import export_hf

    out = export_hf(vlm_from_args(args).eval(), args.out)
    print(
        f"wrote LlavaForConditionalGeneration to {out} (load with LlavaForConditionalGeneration.from_pretrained "
        f"and AutoProcessor.from_pretrained)"
    )


def world_config(args: argparse.Namespace):
    """The mini world asked for by ``--world-scale`` and ``--world-resolution``; None for the default world."""
    from bench.world import WorldConfig

    resolution = getattr(args, "world_resolution", None)
    if args.world_scale == 1.0 and resolution in (None, 64):
        return None
    world = WorldConfig(image_size=resolution or 64)
    return world.scaled(args.world_scale) if args.world_scale != 1.0 else world


def data_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``data`` part of a run config from ``--data``, ``--data-path``, ``--image-folder``, ``--world-scale``."""
    data: dict[str, Any] = {"kind": args.data}
    if args.data == "world":
        world = world_config(args)
        if world is not None:
            data["world"] = dataclasses.asdict(world)
    else:
        if not args.data_path:
            raise ValueError(f"--data {args.data} needs --data-path (a LLaVA JSON file or a local HF dataset)")
        data.update(path=args.data_path, image_folder=args.image_folder)
        if getattr(args, "held_out", None) is not None:
            data["held_out"] = args.held_out
    if getattr(args, "pretrain_steps", None) is not None:
        data["pretrain"] = {"encoder_steps": args.pretrain_steps, "llm_steps": args.pretrain_steps}
    return data


def cmd_run(args: argparse.Namespace) -> None:
    from bench.run import RunConfig, run

    if args.resume:
        run(RunConfig(), Path(args.resume), resume=True, allow_dotted_paths=args.allow_dotted_paths,
            verify=not args.no_verify)  # fmt: skip
        return
    specs = specs_from_args(args)
    specs["encoder"] = {k: v for k, v in specs["encoder"].items() if v is not None}
    specs["llm"] = {k: v for k, v in specs["llm"].items() if v is not None}
    data = data_from_args(args)
    cfg = RunConfig(
        encoder=specs["encoder"],
        connector=specs["connector"],
        llm=specs["llm"],
        data=data,
        recipe=args.recipe,
        seed=args.seed,
        strict=args.strict,
        precision=args.precision,
        backbone_dtype=args.backbone_dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        lora=parse_lora(args.lora),
        qlora=args.qlora,
        init_connector=args.init_connector,
        profile=args.profile,
        max_length=args.max_length,
        feature_cache=args.feature_cache,
        feature_cache_max_gb=args.feature_cache_max_gb,
        num_workers=args.num_workers,
        allow_paths_outside_image_folder=args.allow_paths_outside_image_folder,
        max_image_pixels=args.max_image_pixels,
    )
    if args.qlora and cfg.lora is None:
        cfg.lora = parse_lora("")
    if args.eval_limit is not None:
        cfg.eval_limit = limit(args.eval_limit)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                    ("grad_accum", args.grad_accum), ("lr", args.lr),
                                    ("save_every", args.save_every)) if v is not None}  # fmt: skip
    if overrides:
        recipes = RECIPES_FOR_CLI()
        if args.recipe not in recipes:
            raise ValueError(f"unknown recipe {args.recipe!r}; available: {', '.join(recipes)}")
        if "grad_accum" in overrides:  # an explicit accumulation replaces the recipe's global batch
            overrides["global_batch"] = None
        cfg.stages = [dict(s, **overrides) for s in recipes[args.recipe]]
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{args.encoder}-{args.connector.replace(':', '_')}-{args.llm}-s{args.seed}"
    out = Path(args.out) if args.out else Path("runs") / name
    run(cfg, out, verify=not args.no_verify)
    print(f"run directory: {out}")


def RECIPES_FOR_CLI():  # noqa: N802 (lazy import keeps `bench list` fast)
    from bench.run import RECIPES

    return RECIPES


def cmd_sweep(args: argparse.Namespace) -> None:
    from bench.sweep import split_list, sweep

    base: dict[str, Any] = {"recipe": args.recipe, "eval_limit": limit(args.eval_limit)}
    world = world_config(args)
    if world is not None or args.pretrain_steps is not None:
        from bench.world import WorldConfig

        data: dict[str, Any] = {"kind": "world", "world": dataclasses.asdict(world or WorldConfig())}
        if args.pretrain_steps is not None:
            data["pretrain"] = {"encoder_steps": args.pretrain_steps, "llm_steps": args.pretrain_steps}
        base["data"] = data
    if args.steps is not None:
        base["stages"] = [dict(s, steps=args.steps) for s in RECIPES_FOR_CLI()[args.recipe]]
    out = Path(args.out)
    cells = sweep(out, split_list(args.encoder), split_list(args.connector), split_list(args.llm),
                  args.seeds, base)  # fmt: skip
    report(cells, out)


def report(runs, out: Path) -> None:
    """Tables and plots of finished runs, printed and written to ``out``."""
    from bench.plots import pareto_plots
    from bench.report import write_reports

    written = write_reports(runs, out)
    print(written["markdown"].read_text())
    for path in [*written.values(), *pareto_plots(runs, out)]:
        print(f"wrote {path}")


def cmd_report(args: argparse.Namespace) -> None:
    report(args.runs, Path(args.out))


def cmd_profile(args: argparse.Namespace) -> None:
    from bench.profile import profile

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


def cmd_prune_curve(args: argparse.Namespace) -> None:
    from bench.plots import pruning_plot
    from bench.prune_curve import pruning_curve

    rows = pruning_curve(Path(args.run_dir), [float(r) for r in args.ratios.split(",")], limit(args.eval_limit),
                         allow_dotted_paths=args.allow_dotted_paths, verify=not args.no_verify)  # fmt: skip
    print(f"{'method':<12} {'keep':>6} {'tokens':>7} {'accuracy':>15} {'retained':>9} {'speed-up':>9}")
    for r in rows:
        retained = "n/a" if r["retained"] is None else f"{r['retained']:.1%}"
        acc = f"{r['accuracy']:.3f}" + (f" ± {r['accuracy_std']:.3f}" if r["draws"] > 1 else "")
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{r['method']:<12} {r['keep_ratio']:>6.0%} {r['tokens']:>7.1f} {acc:>15} {retained:>9} {speed:>9}")
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pruning_curve.json", [{k: v for k, v in r.items() if "answers" not in k} for r in rows])
    for path in [out / "pruning_curve.json", *pruning_plot(rows, out / "pruning_curve")]:
        print(f"wrote {path}")  # fmt: skip


def cmd_peer(args: argparse.Namespace) -> None:
    from bench.peer import peer_benchmark
    from bench.run import RunConfig

    specs = specs_from_args(args)
    cfg = RunConfig(encoder={k: v for k, v in specs["encoder"].items() if v is not None}, connector=specs["connector"],
                    llm={k: v for k, v in specs["llm"].items() if v is not None}, data=data_from_args(args),
                    seed=args.seed)  # fmt: skip
    r = peer_benchmark(cfg, steps=args.steps, batch_size=args.batch_size)
    print(
        f"stage 1, {args.encoder} + {specs['connector']['name']} + {args.llm}, {r['steps']} steps x batch "
        f"{r['batch_size']}; this machine multiplies fp32 matrices at {r['matmul_gflops_per_second']:.1f} GFLOP/s:"
    )
    for who, label in (("ours", "connector-zoo (feature cache)"), ("peer", "transformers Trainer + Llava")):
        print(
            f"  {label:<33} {r[who + '_samples_per_second']:8.3g} samples/s  final loss {r[who + '_final_loss']:.4f}"
            f"  peak RSS {r[who + '_peak_rss_bytes'] / 2**30:.2f} GiB  {r[who + '_gflops_per_second']:.1f} GFLOP/s "
            f"({r[who + '_gflops_per_second'] / r['matmul_gflops_per_second']:.0%} of matmul)"
        )
    print(f"  (feature cache built once in {r['ours_feature_cache_seconds']:.1f} s)")
    print(f"  ratio: {r['speedup']:.2f}x")


def cmd_plan(args: argparse.Namespace) -> None:
    from bench.plan import plan
    from bench.run import RunConfig

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


def cmd_eval(args: argparse.Namespace) -> None:
    from bench.evaluate import blind_answers, evaluate_split
    from bench.precision import autocast, run_precision
    from bench.run import RunConfig, feature_sources, load_data
    from bench.vlm import CONFIG_NAME, VLM, WEIGHTS_NAME

    run_dir = Path(args.run_dir)
    if args.tasks:
        return eval_tasks(args, run_dir)
    cfg = RunConfig.from_file(run_dir / "config.json")
    if args.eval_limit is not None:
        cfg.eval_limit = limit(args.eval_limit)
    vlm = VLM.from_config_file(run_dir / CONFIG_NAME, args.allow_dotted_paths).eval()
    _, _, eval_sets, _ = load_data(cfg, print)
    by_table = feature_sources(cfg, vlm, list(eval_sets.values()), print)[1]
    collators = {name: by_table[ds.images.key] for name, ds in eval_sets.items()}
    # the blind baseline uses the LLM as loaded, before the run's trained weights go in (as `bench run` does)
    with autocast(run_precision(run_dir), vlm.device):
        blind = {name: blind_answers(vlm, ds, collators[name], cfg.eval_limit) for name, ds in eval_sets.items()}
    vlm.load_trainable(run_dir / WEIGHTS_NAME, verify=not args.no_verify)
    for name, ds in eval_sets.items():
        with autocast(run_precision(run_dir), vlm.device):
            m = evaluate_split(vlm, ds, collators[name], cfg.eval_limit, blind[name])
        if "accuracy" in m:
            print(f"{name}: accuracy {m['accuracy']['exact_match']:.3f} (blind {m['blind']['exact_match']:.3f}), "
                  f"n={m['accuracy']['count']}; per type {json.dumps(m['accuracy']['per_type'])}")  # fmt: skip
        loss_key = "caption_loss" if "caption_loss" in m else "loss"
        print(f"{name}: {loss_key} {m[loss_key]:.4f}")


def eval_tasks(args: argparse.Namespace, run_dir: Path) -> None:
    """``bench eval RUN --tasks ...``: lmms-eval's tasks and metrics on the run, recorded in its results.json."""
    try:
        from bench.lmms import evaluate_tasks
    except ImportError as err:
        raise SystemExit(f"bench eval --tasks needs lmms-eval: pip install 'connector-zoo[eval]' ({err})") from err
    limit_n = None if args.eval_limit is None else limit(args.eval_limit)
    recorded = evaluate_tasks(run_dir, args.tasks.split(","), limit_n, args.include_path or [], args.batch_size,
                              verify=not args.no_verify, allow_dotted_paths=args.allow_dotted_paths,
                              online=args.online)  # fmt: skip
    for task, entry in recorded.items():
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items())
        print(f"{task}: {metrics} (n={entry['samples']}, lmms-eval {entry['lmms_eval_version']})")


def cmd_save_pretrained(args: argparse.Namespace) -> None:
    from bench.vlm import VLM
    from connector_zoo.hf_model import ConnectorZooForConditionalGeneration
    from connector_zoo.io import read_json

    run_dir = Path(args.run_dir)
    vlm = VLM.load(run_dir, allow_dotted_paths=args.allow_dotted_paths, verify=not args.no_verify).eval()
    results = read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else None
    model = ConnectorZooForConditionalGeneration.from_vlm(vlm)
    model.save_pretrained(args.out, embed_backbones=args.embed_backbones, results=results)
    print(f"wrote {args.out}: AutoModelForImageTextToText.from_pretrained({str(args.out)!r}) after `import connectors`")


def cmd_generate(args: argparse.Namespace) -> None:
    from PIL import Image

    from bench.precision import autocast, run_precision
    from bench.vlm import VLM

    vlm = VLM.load(args.run_dir, allow_dotted_paths=args.allow_dotted_paths, verify=not args.no_verify).eval()
    images = None
    if args.image:
        try:
            images = [Image.open(args.image).convert("RGB")]
        except OSError as err:
            raise OSError(f"cannot read image {args.image!r}: {err}") from err
    with autocast(run_precision(args.run_dir), vlm.device):
        print(vlm.generate(images, [args.prompt], max_new_tokens=args.max_new_tokens)[0])


def cmd_world_build(args: argparse.Namespace) -> None:
    from bench.pretrain import pretrain_encoder, pretrain_llm
    from bench.world import World, WorldConfig

    world = World(world_config(args) or WorldConfig())
    print(f"world: {world.dir}")
    try:
        from bench.lmms import TASKS_DIR, world_task_data

        print(f"lmms-eval task data: {world_task_data(world)} (task folder {TASKS_DIR / 'connector_zoo_world'})")
    except ImportError as err:  # datasets is a core dependency; say what is missing and go on
        print(f"lmms-eval task data not written: {err}")
    for name in args.encoders.split(","):
        print(f"encoder {name}: {pretrain_encoder(name, world)}")
    for name in args.llms.split(","):
        print(f"llm {name}: {pretrain_llm(name, world)}")


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


USER_ERRORS: tuple[type[BaseException], ...] = (RegistryError, ValueError, OSError, KeyError, TypeError)


def main(argv: list[str] | None = None, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    commands = {name[len("cmd_") :]: f for name, f in globals().items() if name.startswith("cmd_")}
    args = build_parser(commands).parse_args(argv)
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
