"""``bench run``, ``bench sweep``, ``bench world build``: training runs and the mini world."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.cli.common import (
    apply_level_defaults,
    component_name,
    data_from_args,
    level_default,
    parse_lora,
    pretrain_from_args,
    report,
    specs_from_args,
    tiling_from_args,
    world_config,
)
from bench.cli.parser import limit


def cmd_run(args: argparse.Namespace) -> None:
    from bench.run.job import run
    from bench.train.settings import RunConfig

    if args.resume:
        run(
            RunConfig(),
            Path(args.resume),
            resume=True,
            allow_dotted_paths=args.allow_dotted_paths,
            verify=not args.no_verify,
            log=quiet_or_print(args),
        )
        return
    cfg = run_config_from_args(args)
    parts = "-".join(component_name(getattr(args, p)).replace(":", "_") for p in ("encoder", "connector", "llm"))
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{parts}-s{args.seed}"
    out = Path(args.out) if args.out else Path("runs") / name
    run(cfg, out, verify=not args.no_verify, log=quiet_or_print(args))
    print(f"run directory: {out}")


def run_config_from_args(args: argparse.Namespace):
    """The RunConfig that ``bench run``'s flags describe."""
    from bench.train.settings import RunConfig
    from bench.train.tracking import parse_report_to

    apply_level_defaults(args)
    specs = specs_from_args(args)
    specs["encoder"] = {k: v for k, v in specs["encoder"].items() if v is not None}
    specs["llm"] = {k: v for k, v in specs["llm"].items() if v is not None}
    data = data_from_args(args)
    # every plain setting travels from its flag to the field of the same name (tests/test_harness.py checks that each
    # RunConfig field has its flag); the structured ones are assembled above
    plain = {name: getattr(args, name) for name in RunConfig.plain_fields() if hasattr(args, name)}
    cfg = RunConfig(
        encoder=specs["encoder"],
        connector=specs["connector"],
        llm=specs["llm"],
        data=data,
        lora=parse_lora(args.lora),
        report_to=parse_report_to(args.report_to),
        tiling=tiling_from_args(args),
        **plain,
    )
    # a configuration file's own stage list (a run's config.yaml), unless --recipe on the command line names others
    file_stages = getattr(args, "stages", None)
    if file_stages is not None and "recipe" not in getattr(args, "given", set()):
        cfg.stages = [dict(s) for s in file_stages]
    if args.qlora and cfg.lora is None:
        cfg.lora = parse_lora("")
    if args.eval_limit is not None:
        cfg.eval_limit = limit(args.eval_limit)
    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("grad_accum", args.grad_accum),
            ("lr", args.lr),
            ("save_every", args.save_every),
        )
        if v is not None
    }
    if overrides:
        recipes = RECIPES_FOR_CLI()
        if not cfg.stages and args.recipe not in recipes:
            raise ValueError(f"unknown recipe {args.recipe!r}; available: {', '.join(recipes)}")
        if "grad_accum" in overrides:  # an explicit accumulation replaces the recipe's global batch
            overrides["global_batch"] = None
        cfg.stages = [dict(s, **overrides) for s in (cfg.stages or recipes[args.recipe])]
    return cfg


def quiet_or_print(args: argparse.Namespace):
    """``--quiet``: nothing on the console but the run directory (every line still goes to its run.log)."""
    if getattr(args, "quiet", False):
        os.environ["CONNECTOR_ZOO_QUIET"] = "1"  # no progress bars either (connector_zoo.io.show_progress)
        return lambda message: None
    return print


def RECIPES_FOR_CLI():  # noqa: N802 (lazy import keeps `bench list` fast)
    from bench.train.recipes import RECIPES

    return RECIPES


def cmd_sweep(args: argparse.Namespace) -> None:
    from bench.report.sweep import split_list, sweep
    from bench.train.tracking import parse_report_to

    if args.status:
        return cmd_sweep_status(Path(args.status))
    apply_level_defaults(args)
    base: dict[str, Any] = {"recipe": args.recipe, "eval_limit": limit(args.eval_limit)}
    if args.precision != "auto":  # (not written when not given: the cells of older sweeps keep their keys)
        base["precision"] = args.precision
    if args.report_to:
        base["report_to"] = parse_report_to(args.report_to)
    tiling = tiling_from_args(args)
    if tiling is not None:  # (likewise)
        base["tiling"] = tiling
    data = data_from_args(argparse.Namespace(**{**vars(args), "data": "world"}))
    if set(data) != {"kind"}:  # a data option was given: a sweep's cells name their world
        from bench.data.world import WorldConfig

        base["data"] = {"world": WorldConfig().as_dict(), **data}
    if args.steps is not None:
        base["stages"] = [dict(s, steps=args.steps) for s in RECIPES_FOR_CLI()[args.recipe]]
    out = Path(args.out)
    slurm = None
    if args.launcher == "slurm":
        from bench.report.slurm import SlurmSettings

        slurm = SlurmSettings(
            partition=args.slurm_partition,
            cpus=args.slurm_cpus,
            gpus=args.slurm_gpus,
            mem_gb=args.slurm_mem_gb,
            time_min=args.slurm_time_min,
            parallel=args.slurm_parallel,
        )
    cells = sweep(
        out,
        split_list(args.encoder),
        split_list(args.connector),
        split_list(args.llm),
        args.seeds,
        base,
        slurm=slurm,
        recipe_in_name=args.recipe != level_default(args, "recipe"),  # beside the default recipe's cells of one folder
    )
    if slurm is not None:
        if not args.wait:
            print(f"`bench sweep --status {out}` lists the cells' states; --wait waits for them and writes the report")
            return
        from bench.report.slurm import format_status, wait

        rows = wait(out)
        if any(r["state"] != "done" for r in rows):
            print(format_status(rows))
            sys.exit(f"bench sweep: {sum(r['state'] != 'done' for r in rows)} cells of {out} did not finish (above)")
    report(cells, out)


def cmd_sweep_status(out: Path) -> None:
    from bench.report.slurm import format_status, status

    print(format_status(status(out)))


def cmd_world_build(args: argparse.Namespace) -> None:
    from bench.data.world import World, WorldConfig
    from bench.train.pretrain import pretrain_encoder, steps
    from bench.train.world_llm import pretrain_llm

    world = World(world_config(args) or WorldConfig())
    pre = pretrain_from_args(args)  # the backbones `bench run` with the same world options builds
    print(f"world: {world.dir}")
    try:
        from bench.evaluate.lmms import TASKS_DIR, world_task_data

        print(f"lmms-eval task data: {world_task_data(world)} (task folder {TASKS_DIR / 'connector_zoo_world'})")
    except ImportError as err:  # datasets: the hf extra (with eval); say what is missing and go on
        print(f"lmms-eval task data not written: {err}")
    for name in args.encoders.split(","):
        print(f"encoder {name}: {pretrain_encoder(name, world, **steps(pre, 'encoder'))}")
    for name in args.llms.split(","):
        print(f"llm {name}: {pretrain_llm(name, world, **steps(pre, 'llm'))}")
