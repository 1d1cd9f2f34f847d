"""``bench eval`` (with ``--tasks``: lmms-eval), ``bench generate``, ``bench prune-curve``, ``bench peer``,
``bench report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.cli.common import (
    data_from_args,
    load_run,
    report,
    specs_from_args,
)
from bench.cli.parser import limit
from connector_zoo.io import write_json


def cmd_eval(args: argparse.Namespace) -> None:
    from bench.evaluate.accuracy import blind_answers, evaluate_split, shown_loss
    from bench.run.record import questions
    from bench.train.assemble import feature_sources, load_data
    from bench.train.settings import RunConfig
    from connector_zoo.model.precision import autocast, run_precision

    run_dir = Path(args.run_dir)
    if args.tasks:
        return eval_tasks(args, run_dir)
    cfg = RunConfig.from_file(run_dir / "config.json")
    if args.eval_limit is not None:
        cfg.eval_limit = limit(args.eval_limit)
    vlm = load_run(run_dir, args, weights=False)
    _, _, eval_sets, _ = load_data(cfg, print)
    by_table = feature_sources(cfg, vlm, list(eval_sets.values()), print)[1]
    collators = {name: by_table[ds.images.key] for name, ds in eval_sets.items()}
    # the blind baseline uses the LLM as loaded, before the run's trained weights go in (as `bench run` does)
    with autocast(run_precision(run_dir), vlm.device):
        blind = {name: blind_answers(vlm, ds, collators[name], cfg.eval_limit) for name, ds in eval_sets.items()}
    vlm.load_weights(run_dir, verify=not args.no_verify)
    for name, ds in eval_sets.items():
        with autocast(run_precision(run_dir), vlm.device):
            m = evaluate_split(vlm, ds, collators[name], cfg.eval_limit, blind[name])
        if "accuracy" in m:
            print(
                f"{name}: accuracy {m['accuracy']['exact_match']:.3f} (blind {m['blind']['exact_match']:.3f}), "
                f"{questions(m['accuracy'])}; per type {json.dumps(m['accuracy']['per_type'])}"
            )
        loss_key = "caption_loss" if "caption_loss" in m else "loss"
        print(f"{name}: {loss_key} {shown_loss(m[loss_key], 4)}")


def eval_tasks(args: argparse.Namespace, run_dir: Path) -> None:
    """``bench eval RUN --tasks ...``: lmms-eval's tasks and metrics on the run, recorded in its results.json."""
    try:
        from bench.evaluate.lmms import evaluate_tasks
    except ImportError as err:
        raise SystemExit(f"bench eval --tasks needs lmms-eval: pip install 'connector-zoo[eval]' ({err})") from err
    limit_n = None if args.eval_limit is None else limit(args.eval_limit)
    recorded = evaluate_tasks(
        run_dir,
        args.tasks.split(","),
        limit_n,
        args.include_path or [],
        args.batch_size,
        verify=not args.no_verify,
        allow_dotted_paths=args.allow_dotted_paths,
        online=args.online,
    )
    for task, entry in recorded.items():
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items())
        print(f"{task}: {metrics} (n={entry['samples']}, lmms-eval {entry['lmms_eval_version']})")


def cmd_generate(args: argparse.Namespace) -> None:
    from PIL import Image

    from connector_zoo.model.precision import autocast, run_precision

    vlm = load_run(args.run_dir, args)
    images = None
    if args.image:
        try:
            images = [Image.open(args.image).convert("RGB")]
        except OSError as err:
            raise OSError(f"cannot read image {args.image!r}: {err}") from err
    with autocast(run_precision(args.run_dir), vlm.device):
        print(vlm.generate(images, [args.prompt], max_new_tokens=args.max_new_tokens)[0])


def cmd_prune_curve(args: argparse.Namespace) -> None:
    from bench.evaluate.profile import REDUCERS
    from bench.evaluate.prune_curve import pruning_curve
    from bench.report.plots import PLOTS_NEED, have_matplotlib, pruning_plot

    methods = tuple(args.methods.split(",")) if args.methods else REDUCERS  # unknown ones: one line from pruning_curve
    rows = pruning_curve(
        Path(args.run_dir),
        [float(r) for r in args.ratios.split(",")],
        limit(args.eval_limit),
        allow_dotted_paths=args.allow_dotted_paths,
        verify=not args.no_verify,
        methods=methods,
    )
    print(f"{'method':<12} {'keep':>6} {'tokens':>7} {'accuracy':>15} {'retained':>9} {'speed-up':>9}")
    for r in rows:
        retained = "n/a" if r["retained"] is None else f"{r['retained']:.1%}"
        acc = f"{r['accuracy']:.3f}" + (f" ± {r['accuracy_std']:.3f}" if r["draws"] > 1 else "")
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{r['method']:<12} {r['keep_ratio']:>6.0%} {r['tokens']:>7.1f} {acc:>15} {retained:>9} {speed:>9}")
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pruning_curve.json", [{k: v for k, v in r.items() if "answers" not in k} for r in rows])
    can_plot = have_matplotlib()
    plots = pruning_plot(rows, out / "pruning_curve") if can_plot else []
    for path in [out / "pruning_curve.json", *plots]:
        print(f"wrote {path}")
    if not can_plot:
        print(f"plot skipped ({PLOTS_NEED})")


def cmd_peer(args: argparse.Namespace) -> None:
    from bench.evaluate.peer import peer_benchmark
    from bench.train.settings import RunConfig

    specs = specs_from_args(args)
    cfg = RunConfig(
        encoder={k: v for k, v in specs["encoder"].items() if v is not None},
        connector=specs["connector"],
        llm={k: v for k, v in specs["llm"].items() if v is not None},
        data=data_from_args(args),
        seed=args.seed,
    )
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


def cmd_report(args: argparse.Namespace) -> None:
    report(args.runs, Path(args.out), Path(args.html) if args.html else None, args.gallery_per_type)
