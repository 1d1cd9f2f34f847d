"""The ``bench`` command line: every command's options, each integer and fraction range-checked as it is parsed
(``--steps -3`` is one line naming the option, the value and the range). ``bench.cli`` holds what the commands do."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from connector_zoo.settings import PILLOW_MAX_IMAGE_PIXELS as DEFAULT_MAX_PIXELS
from connector_zoo.settings import arg_type, parse_settings, parse_value  # noqa: F401 (the CLI's names)

#: ``bench list`` families: module and registry attribute (imported only when listed)
FAMILIES = {"encoders": ("encoders", "ENCODERS"), "connectors": ("connectors", "CONNECTORS"), "llms": ("llms", "LLMS")}
POSITIVE = arg_type(int, lo=1)
NON_NEGATIVE = arg_type(int, lo=0)
FRACTION = arg_type(float, lo=0, hi=1, lo_open=True, hi_open=True)
SCALE = arg_type(float, lo=0, lo_open=True)
EVAL_LIMIT = arg_type(int, lo=0, words={"all": "all"})


def limit(value: int | str) -> int | None:
    """``--eval-limit``: a count, or ``all`` (no limit: None)."""
    return None if value == "all" else value


class Parser(argparse.ArgumentParser):
    """Bad options print one line (what was wrong and where help is), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def SEEDS(text: str) -> list[int]:  # noqa: N802 (an argparse type, named like the others)
    return [NON_NEGATIVE(s) for s in text.split(",")]


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="world", choices=["world", "llava", "hf"])
    p.add_argument("--data-path", help="LLaVA JSON file or local Hugging Face dataset directory")
    p.add_argument("--image-folder", help="image folder for LLaVA JSON")
    add_world_args(p)
    add_turns_arg(p)


def add_turns_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qa-turns",
        type=POSITIVE,
        default=None,
        metavar="N",
        help="mini world training: up to N of a scene's questions as the turns of one conversation "
        "(default 1: one question a sample, 7 with --world-llm smollm2; evaluation always asks one)",
    )
    p.add_argument(
        "--train-questions",
        type=POSITIVE,
        default=None,
        metavar="K",
        help="mini world training: K questions a training image, drawn afresh by the world's generator (one of each "
        "of its 7 types while types last) instead of the 3 it recorded; with --qa-turns K they are one conversation "
        "(the splits a run is scored on keep their recorded questions; default: the recorded ones, 7 fresh ones with"
        " --world-llm smollm2)",
    )
    p.add_argument(
        "--qa-branches",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mini world training, with --qa-turns N: the N questions share the image but each is answered as if "
        "asked alone (it attends to the image and itself, not to the other questions and answers), as evaluation "
        "asks; the visual tokens are computed once (packed rows, varlen attention; default: on with --world-llm "
        "smollm2 and more than one turn, off otherwise)",
    )


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        default="auto",
        help="compute precision: auto (bf16/fp16 on GPU, fp32 on CPU), no (fp32), bf16, fp16 (bf16 on CPU)",
    )


def add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-scale", type=SCALE, default=1.0, help="scale the mini world's splits (tests: 0.01)")
    p.add_argument(
        "--world-resolution",
        type=POSITIVE,
        metavar="PX",
        help="mini world image side in pixels (default 64: 8x8 patches of 8 px; 128: 16x16; 192: 24x24)",
    )
    p.add_argument(
        "--world-object-scale",
        type=arg_type(float, lo=0, hi=1, lo_open=True),
        metavar="F",
        help="mini world objects F times their default size (default 1); with a larger --world-resolution, small "
        "objects that a view resized to the encoder's input loses (the AnyRes comparison)",
    )
    p.add_argument(
        "--world-encoder-px",
        type=POSITIVE,
        metavar="PX",
        help="the world encoder's input side (default: the world's image side); smaller, it is pretrained on the"
        " images resized to it and on squares cut at their own resolution, AnyRes's global view and tiles",
    )
    p.add_argument(
        "--world-encoder-recolour",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the world encoder pretrained on recoloured images, every colour-shape pair seen, also the"
        " compositional split's held-out ones (default: on with --world-llm smollm2, off otherwise); docs:"
        " mini-world.md",
    )
    p.add_argument(
        "--world-llm",
        choices=("small", "wide", "smollm2"),
        default="small",
        help="mini world LLM level: small (default; d=128), wide (d=256, --recipe mini-wide) or smollm2 "
        "(pretrained SmolLM2-135M; its defaults: --recipe mini-smollm2 --qa-turns 7 --train-questions 7 "
        "--qa-branches); docs: what each costs and gives",
    )


def add_tiling_args(p: argparse.ArgumentParser, help_tiling: str) -> None:
    p.add_argument("--tiling", choices=["none", "anyres"], default="none", help=help_tiling)
    p.add_argument(
        "--grid-pinpoints",
        help="--tiling anyres: HEIGHTxWIDTH,... (default LLaVA-NeXT's 336x672,672x336,672x672,1008x336,336x1008, "
        "scaled to the encoder's input size)",
    )
    p.add_argument(
        "--max-tiles",
        type=POSITIVE,
        metavar="N",
        help="--tiling anyres: LLaVA-OneVision's anyres_max_N: a tile grid with more than N views' worth of tokens is "
        "resized bilinearly to N views' worth (grid connectors)",
    )


def add_trust_args(p: argparse.ArgumentParser) -> None:
    """Options for commands that read a run directory written by someone else."""
    g = p.add_argument_group("reading a run directory")
    g.add_argument(
        "--allow-dotted-paths",
        action="store_true",
        help="let the run's config name components by dotted path (imports and runs that module)",
    )
    g.add_argument(
        "--no-verify",
        action="store_true",
        help="load weights whose SHA-256 does not match the run's manifest.json (or that has none)",
    )


def add_config_arg(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML file of bench {command}'s options (keys as the flags: batch_size or batch-size); flags given here "
        "override it" + (" (a run's own config.yaml trains it again)" if command == "run" else ""),
    )


def add_report_to_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report-to",
        metavar="TRACKERS",
        help="experiment trackers, comma-separated: tensorboard, wandb, mlflow, trackio, all (those installed) or "
        "none (default); through accelerate, files under <run>/trackers",
    )


def add_component_args(p: argparse.ArgumentParser, connector_default: str | None = "mlp2x_gelu") -> None:
    g = p.add_argument_group("components")
    g.add_argument("--encoder", default="clip", help="encoder name or dotted path (default: clip)")
    g.add_argument("--encoder-checkpoint", help="preset (tiny, tiny-24, tiny-27), hub id or local directory")
    g.add_argument("--layer", type=arg_type(int), help="encoder layer, transformers hidden_states index (default -2)")
    g.add_argument("--connector", default=connector_default, help="connector name(s) or dotted path")
    g.add_argument("--connector-arg", action="append", metavar="KEY=VALUE", help="connector setting (repeatable)")
    g.add_argument("--llm", default="vicuna", help="LLM backend name or dotted path (default: vicuna)")
    g.add_argument("--llm-checkpoint", help="preset (tiny), hub id or local directory")


def build_parser(commands: dict[str, Callable[[argparse.Namespace], None]]) -> argparse.ArgumentParser:
    """The parser; ``commands`` maps each command (``world build`` as ``world_build``) to its function."""
    parser = Parser(prog="bench", description="connector-zoo: train and benchmark VLM connectors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered encoders, connectors and LLM backends")
    p.add_argument("family", nargs="?", choices=sorted(FAMILIES))
    p.set_defaults(func=commands["list"])

    p = sub.add_parser("tokens", help="visual tokens per image and parameter count of connectors")
    add_component_args(p, connector_default="linear,mlp2x_gelu")
    p.add_argument("--images", type=POSITIVE, default=4, help="number of demo images (flat, stripes, checker, noise)")
    add_tiling_args(p, "anyres: LLaVA-NeXT's tiles for --image-size")
    p.add_argument("--image-size", default="672x672", help="--tiling anyres: HEIGHTxWIDTH[,HEIGHTxWIDTH...]")
    p.set_defaults(func=commands["tokens"])

    p = sub.add_parser("run", help="train and evaluate one combination (default: the offline mini world)")
    add_config_arg(p, "run")
    add_component_args(p, connector_default="qformer")
    p.set_defaults(llm="tinyllama")
    p.add_argument(
        "--recipe",
        default=None,
        help="named training recipe (default mini, mini-smollm2 with --world-llm smollm2; llava-1.5-pretrain, "
        "budget, ...)",
    )
    p.add_argument("--steps", type=NON_NEGATIVE, help="optimizer steps of every stage (0: no training)")
    p.add_argument("--batch-size", type=POSITIVE, help="override the per-process batch size of every stage")
    p.add_argument("--grad-accum", type=POSITIVE, help="override the gradient accumulation of every stage")
    p.add_argument("--lr", type=arg_type(float, lo=0, lo_open=True), help="override every stage's learning rate")
    p.add_argument("--save-every", type=POSITIVE, help="steps between checkpoints")
    p.add_argument("--pretrain-steps", type=POSITIVE, help="mini world: steps of the backbones' pretraining (tests)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    add_data_args(p)
    p.add_argument("--held-out", type=FRACTION, help="fraction of LLaVA / HF data held out for evaluation (0.05)")
    p.add_argument(
        "--eval-limit",
        type=EVAL_LIMIT,
        help="questions evaluated per split: N, 0 (no evaluation) or all (default 1000)",
    )
    p.add_argument(
        "--allow-paths-outside-image-folder",
        action="store_true",
        help="LLaVA JSON: let image paths resolve (links followed) outside --image-folder",
    )
    p.add_argument(
        "--max-image-pixels",
        type=NON_NEGATIVE,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels, before decoding (default {DEFAULT_MAX_PIXELS}, Pillow's limit; 0: none)",
    )
    add_tiling_args(p, "anyres: each image as LLaVA-NeXT's global view + tiles, connected view by view (default none)")
    add_precision_arg(p)
    p.add_argument(
        "--backbone-dtype",
        default="auto",
        help="storage dtype of the frozen encoder and LLM: auto (the "
        "precision's on GPU, fp32 on CPU), fp32, bf16, fp16; trainable weights stay fp32",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute the LLM's activations in backward (default: the recipe's; on in llava-1.5-finetune*)",
    )
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sort each optimizer step's samples by length before cutting micro-batches, so they pad less (LLaVA's "
        "length grouping; default: the recipe's, on in llava-1.5-finetune*)",
    )
    p.add_argument(
        "--lora",
        nargs="?",
        const="",
        metavar="r=128,alpha=256,dropout=0.05[,targets=q_proj+v_proj]",
        help="LoRA (peft) on the LLM in the stages that train it; bare --lora takes LLaVA-1.5's settings",
    )
    p.add_argument("--qlora", action="store_true", help="QLoRA: 4-bit NF4 base LLM through bitsandbytes (CUDA only)")
    p.add_argument(
        "--init-connector",
        metavar="RUN_DIR",
        help="start from another run's connector weights (stage 2 after a stage-1 run)",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure FLOPs, latency and decode speed after training (default: on for the mini world)",
    )
    p.add_argument("--max-length", type=POSITIVE, help="context budget in tokens (default: the LLM's)")
    p.add_argument(
        "--packing",
        choices=["auto", "on", "off"],
        default="auto",
        help="training rows hold several samples (no attention across them, no padding between them; rows as wide "
        "as the micro-batch's longest sample): on, off, auto (on for --data llava/hf, off for the mini world)",
    )
    p.add_argument(
        "--shard",
        choices=["none", "full"],
        default="none",
        help="full: FSDP2 (fully_shard per decoder layer + the rest) over the processes torchrun / accelerate "
        "start, in every stage that trains the LLM; weights, gradients and optimizer state split across them (GPUs, "
        "or CPUs over gloo); checkpoints written whole. none: every process holds the whole model",
    )
    p.add_argument(
        "--feature-cache",
        choices=["auto", "on", "off"],
        default="auto",
        help="frozen-encoder features: on (stored in the encoder's dtype as batches first need them, reused across "
        "epochs, runs and connectors), off (encoded every batch), auto (on when the projected size fits "
        "--feature-cache-max-gb; the log says which and why)",
    )
    p.add_argument(
        "--feature-cache-max-gb", type=arg_type(float, lo=0), help="auto's limit (default: half the free disk)"
    )
    p.add_argument(
        "--num-workers",
        type=NON_NEGATIVE,
        help="data-loader worker processes (default: CPU cores - 1, max 8; 0: load in the main process)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--out", help="run directory (default runs/<time>-<parts>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="print only the run directory (the log goes to its run.log)")
    add_report_to_arg(p)
    add_trust_args(p)
    p.set_defaults(func=commands["run"])

    p = sub.add_parser("sweep", help="run a grid of configurations and tabulate them")
    add_config_arg(p, "sweep")
    p.add_argument("--encoder", default="clip", help="comma-separated encoders")
    p.add_argument(
        "--connector",
        default="linear,mlp2x_gelu,qformer,cls_prune,focus_moe",
        help="comma-separated connectors, settings in brackets: cls_prune[keep_ratio=0.25]",
    )
    p.add_argument("--llm", default="tinyllama", help="comma-separated LLM backends")
    p.add_argument("--seeds", type=SEEDS, default="0,1,2", help="comma-separated seeds (default 3: mean ± std)")
    p.add_argument("--recipe", default=None, help="(default mini, mini-smollm2 with --world-llm smollm2)")
    p.add_argument("--steps", type=NON_NEGATIVE)
    add_world_args(p)
    add_turns_arg(p)
    add_precision_arg(p)
    add_tiling_args(p, "anyres: every cell tiles its images (LLaVA-NeXT's AnyRes; default none)")
    p.add_argument("--pretrain-steps", type=POSITIVE)
    p.add_argument("--eval-limit", type=EVAL_LIMIT, default=1000)
    p.add_argument("--out", default="sweeps/default", help="sweep directory (one run directory per cell)")
    add_report_to_arg(p)
    p.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local: the cells one after another in this process; slurm: one Slurm job each (submitit; a job array, "
        "requeued jobs resume from their cell's last checkpoint)",
    )
    p.add_argument("--slurm-partition", help="--launcher slurm: the partition (default: the cluster's default)")
    p.add_argument("--slurm-cpus", type=POSITIVE, default=2, help="--launcher slurm: CPUs per cell")
    p.add_argument("--slurm-gpus", type=NON_NEGATIVE, default=0, help="--launcher slurm: GPUs per cell")
    p.add_argument("--slurm-mem-gb", type=float, help="--launcher slurm: memory per cell in GB")
    p.add_argument("--slurm-time-min", type=POSITIVE, default=240, help="--launcher slurm: time limit per cell")
    p.add_argument(
        "--slurm-parallel", type=POSITIVE, default=4, help="--launcher slurm: cells running at once (array limit)"
    )
    p.add_argument("--wait", action="store_true", help="--launcher slurm: wait for the cells, then write the report")
    p.add_argument(
        "--status",
        metavar="SWEEP_DIR",
        help="list a sweep's cells as done, pending, running, failed (with the error's last line) or not submitted, "
        "with their Slurm job ids and logs; nothing is run",
    )
    p.set_defaults(func=commands["sweep"])

    p = sub.add_parser("report", help="tables (Markdown, CSV, LaTeX) and plots from run directories")
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--out", default="report", help="where to write table.md/.csv/.tex and the plots")
    p.add_argument(
        "--html",
        metavar="DIR",
        help="also write one self-contained page, DIR/index.html: table, "
        "plots, loss curves, pruning curve, error breakdown and answer gallery",
    )
    p.add_argument(
        "--gallery-per-type",
        type=POSITIVE,
        default=4,
        metavar="N",
        help="questions per question type in the HTML gallery (default 4)",
    )
    p.set_defaults(func=commands["report"])

    p = sub.add_parser("profile", help="efficiency figures of a combination (no training)")
    add_component_args(p)
    p.add_argument("--run", help="profile a trained run directory instead")
    p.add_argument("--images", type=POSITIVE, default=4)
    p.add_argument(
        "--image-size", metavar="HxW", help="the demo images' HEIGHTxWIDTH (default: the encoder's input, square)"
    )
    add_tiling_args(p, "anyres: LLaVA-NeXT's tiles (default none; a --run keeps its own)")
    p.add_argument("--repeats", type=POSITIVE, default=5)
    p.add_argument(
        "--keep",
        type=arg_type(float, lo=0, hi=1, lo_open=True),
        metavar="SHARE",
        help="compare the "
        "prefill of the first --connector (a per-token projector) alone and of each reducer (cls_prune, "
        "random_keep, avgpool, visionzip, prumerge, fastv) in front of it keeping SHARE of the image "
        "tokens, in interleaved rounds",
    )
    p.add_argument(
        "--fastv-layer",
        type=POSITIVE,
        default=2,
        metavar="K",
        help="with --keep: fastv prunes after LLM layer K (default 2, the paper's)",
    )
    add_trust_args(p)
    p.add_argument("--json", action="store_true", help="also print the full result as JSON")
    p.set_defaults(func=commands["profile"])

    p = sub.add_parser("prune-curve", help="training-free cls_prune of a trained linear/MLP run at several ratios")
    p.add_argument("run_dir")
    p.add_argument("--ratios", default="1,0.75,0.5,0.25,0.1,0.05")
    p.add_argument("--methods", default=None, help="comma-separated reducers (default: all of bench profile's)")
    p.add_argument("--out", help="where to write pruning_curve.json/.png/.svg (default: the run directory)")
    p.add_argument("--eval-limit", type=EVAL_LIMIT, default=1000)
    add_trust_args(p)
    p.set_defaults(func=commands["prune_curve"])

    p = sub.add_parser("peer", help="this harness vs transformers Trainer + LlavaForConditionalGeneration")
    add_component_args(p)
    p.set_defaults(llm="tinyllama")
    p.add_argument("--steps", type=POSITIVE, help="optimizer steps (default 60; 4 with --length-mix)")
    p.add_argument("--batch-size", type=POSITIVE, help="samples per step (default 16; 4 with --length-mix)")
    p.add_argument(
        "--length-mix",
        action="store_true",
        help="stage 2 on LLaVA-665K-shaped lengths, against HF with and without group_by_length (3 processes a round)",
    )
    p.add_argument("--rounds", type=POSITIVE, default=3, help="--length-mix: interleaved rounds (median and spread)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-3; 2e-5 with --length-mix)")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="--length-mix: recompute activations, both sides"
    )
    p.add_argument(
        "--precision",
        choices=("no", "bf16"),
        default="no",
        help="no: fp32 (default); bf16: autocast on both sides (ours' --precision bf16, the peer's bf16=True), fp32"
        " master weights",
    )
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    add_data_args(p)
    p.add_argument("--pretrain-steps", type=POSITIVE)
    p.set_defaults(func=commands["peer"])

    p = sub.add_parser("plan", help="parameters, memory per device and FLOPs of a configuration and recipe")
    add_component_args(p)
    p.add_argument("--recipe", default="llava-1.5-finetune")
    p.add_argument("--devices", type=POSITIVE, default=8)
    p.add_argument("--batch-size", type=POSITIVE, help="per-device batch (default: the recipe's)")
    p.add_argument(
        "--text-tokens", type=NON_NEGATIVE, default=512, help="text tokens per sample besides the visual ones"
    )
    p.add_argument("--backbone-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--lora", nargs="?", const="", help="LoRA on the LLM in stage 2 (as for bench run)")
    add_tiling_args(p, "anyres: plan for LLaVA-NeXT's tiles, at the largest pinpoint (default none)")
    p.set_defaults(func=commands["plan"])

    p = sub.add_parser("eval", help="evaluate a run directory")
    p.add_argument("run_dir")
    p.add_argument("--eval-limit", type=EVAL_LIMIT, help="questions per split: N, 0 or all (default: the run's)")
    p.add_argument("--tasks", help="lmms-eval tasks instead (comma-separated: connector_zoo_world, pope, gqa, mme...)")
    p.add_argument("--include-path", action="append", help="a folder of lmms-eval task YAML files (repeatable)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="lmms-eval generation batch")
    p.add_argument("--online", action="store_true", help="let lmms-eval download task data (offline by default)")
    add_trust_args(p)
    p.set_defaults(func=commands["eval"])

    p = sub.add_parser("generate", help="answer a prompt about an image with a trained run")
    p.add_argument("run_dir")
    p.add_argument("--image")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    add_trust_args(p)
    p.set_defaults(func=commands["generate"])

    p = sub.add_parser("world", help="the embedded mini world")
    wsub = p.add_subparsers(dest="world_command", required=True)
    w = wsub.add_parser("build", help="build the world and pretrain its miniature backbones")
    w.add_argument("--encoders", default="clip")
    w.add_argument("--llms", default="tinyllama")
    add_world_args(w)
    w.set_defaults(func=commands["world_build"])

    p = sub.add_parser(
        "export-hf", help="write a transformers LlavaForConditionalGeneration directory (LlavaNext for AnyRes)"
    )
    add_component_args(p)
    add_tiling_args(p, "anyres: a fresh model tiles its images and exports as LlavaNext (a --run keeps its own)")
    p.add_argument("--run", help="a run directory (vlm_config.json + trainable.safetensors) to export")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold LoRA adapters into the LLM (default); --no-merge writes the base weights and the adapters "
        "apart, as <out>/adapter in peft's format (model.load_adapter)",
    )
    add_trust_args(p)
    p.set_defaults(func=commands["export_hf"])

    p = sub.add_parser("save-pretrained", help="a run as a transformers model (AutoModelForImageTextToText)")
    p.add_argument("run_dir")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--embed-backbones",
        action="store_true",
        help="write the encoder and LLM into the directory (default: referenced by checkpoint)",
    )
    add_trust_args(p)
    p.set_defaults(func=commands["save_pretrained"])
    return parser
