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
    from bench.evaluate.accuracy import blind_baselines, evaluate_split, shown_loss
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
        blind = blind_baselines(vlm, eval_sets, collators, cfg.eval_limit, cfg.feature_cache)
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


PRECISION_WORDS = {"no": "fp32", "bf16": "bf16 autocast"}


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
    if args.length_mix:
        return peer_length_mix(cfg, args)
    r = peer_benchmark(
        cfg, steps=args.steps or 60, batch_size=args.batch_size or 16, lr=args.lr or 2e-3, precision=args.precision
    )
    print(
        f"stage 1, {args.encoder} + {specs['connector']['name']} + {args.llm}, {r['steps']} steps x batch "
        f"{r['batch_size']}, {PRECISION_WORDS[args.precision]}; this machine multiplies "
        f"{PRECISION_WORDS[args.precision].split()[0]} matrices at {r['matmul_gflops_per_second']:.1f} GFLOP/s:"
    )
    for who, label in (("ours", "connector-zoo (feature cache)"), ("peer", "transformers Trainer + Llava")):
        print(
            f"  {label:<33} {r[who + '_samples_per_second']:8.3g} samples/s  final loss {r[who + '_final_loss']:.4f}"
            f"  peak RSS {r[who + '_peak_rss_bytes'] / 2**30:.2f} GiB  {r[who + '_gflops_per_second']:.1f} GFLOP/s "
            f"({r[who + '_gflops_per_second'] / r['matmul_gflops_per_second']:.0%} of matmul)"
        )
    print(f"  (feature cache built once in {r['ours_feature_cache_seconds']:.1f} s)")
    print(f"  ratio: {r['speedup']:.2f}x")


def peer_length_mix(cfg, args: argparse.Namespace) -> None:
    from bench.evaluate.peer_mix import length_mix_peer, summary

    r = length_mix_peer(
        cfg,
        steps=args.steps or 4,
        batch_size=args.batch_size or 4,
        lr=args.lr or 2e-5,
        rounds=args.rounds,
        gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision,
    )
    s = summary(r)
    print(
        f"stage 2 on the length mix, {args.encoder} + {cfg.connector['name']} + {args.llm}, {r['steps']} steps x batch "
        f"{r['batch_size']} ({r['useful_tokens']} useful tokens), {PRECISION_WORDS[args.precision]}, {r['rounds']} "
        f"interleaved rounds (median [min, max]); this machine multiplies {PRECISION_WORDS[args.precision].split()[0]}"
        f" matrices at {r['matmul_gflops_per_second']:.1f} GFLOP/s:"
    )

    def fig(d: dict[str, float], f: str) -> str:
        return f"{d['median']:{f}} [{d['min']:{f}}, {d['max']:{f}}]"

    labels = {
        "ours": "connector-zoo (packed, cache)",
        "hf-grouped": "HF Trainer + Llava, grouped",
        "hf": "HF Trainer + Llava",
    }
    for side, label in labels.items():
        x = s[side]
        print(
            f"  {label:<29} {fig(x['useful_tokens_per_second'], '.4g')} useful tokens/s  "
            f"{fig(x['samples_per_second'], '.3g')} samples/s  padding {x['padding_share']['median']:.1%}  "
            f"peak RSS {fig(x['peak_rss_gib'], '.2f')} GiB  model {x['model_gflops_per_second']['median']:.1f} "
            f"GFLOP/s ({x['model_gflops_per_second']['median'] / r['matmul_gflops_per_second']:.0%} of matmul)"
        )
    for peer in ("hf-grouped", "hf"):
        print(
            f"  ours / {labels[peer].strip()}: {fig(s['speedup_vs_' + peer], '.2f')}x useful tokens/s, "
            f"peak RSS {fig(s['rss_vs_' + peer], '.2f')}x"
        )
    print("  loss per step, ours: " + " ".join(f"{v:.4f}" for v in s["ours"]["losses"]))
    print("  loss per step, hf:   " + " ".join(f"{v:.4f}" for v in s["hf"]["losses"]))
    print(f"  largest relative gap between ours' and hf's loss at a step (same batches): {s['loss_gap']:.2e}")


def cmd_report(args: argparse.Namespace) -> None:
    report(args.runs, Path(args.out), Path(args.html) if args.html else None, args.gallery_per_type)
