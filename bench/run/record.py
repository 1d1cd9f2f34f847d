"""A run's record: ``results.json`` (metrics, efficiency, memory, versions), ``summary.txt``, the final model
(linked from the last checkpoint) and its transformers-format copy ``hf/``."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from bench.data.features import FeatureCache
from bench.data.formats import Dataset
from bench.evaluate.accuracy import evaluate_split, shown_loss
from bench.evaluate.profile import profile
from bench.train.precision import machine_info
from bench.train.pretrain import world_backbones
from connector_zoo.io import MANIFEST_NAME, atomic_path, link_or_copy, link_tree, read_json, write_json
from connector_zoo.model.modeling import write_run_model
from connector_zoo.model.vlm import ADAPTER_DIR, CONFIG_NAME, VLM, WEIGHTS_NAME, VLMInputs


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the checkout holding ``where`` (default: this code), with "-dirty" when tracked files differ
    from it (the numbers then come from code no commit holds); None outside a git checkout."""
    here = where or Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
        commit = out.stdout.strip()
        if not commit:
            return None
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here
        ).stdout.strip()
        return commit + ("-dirty" if changed else "")
    except OSError:
        return None


def versions() -> dict[str, str]:
    """The resolved versions of the libraries whose behaviour the numbers depend on (recorded in results.json and
    printed at the top of the CI log and of the test report, so a drift between two machines is visible)."""

    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "tokenizers",
        "accelerate",
        "timm",
        "open_clip_torch",
        "peft",
        "numpy",
        "pillow",
        "safetensors",
        "datasets",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def cpu_name() -> str:
    """The CPU's model name (timings are only comparable on the same one), and whether it has AMX (bf16 matmuls)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return f"{name or platform.machine()}{', AMX' if 'amx_bf16' in info else ', no AMX'}"


def efficiency(vlm: VLM, data: Dataset) -> dict[str, Any]:
    """Measured figures of the trained model (``bench.evaluate.profile``): FLOPs, prefill latency, decode speed,
    memory."""

    indices = sorted({s.image for s in data.samples if s.image is not None})[:4]
    if not indices:
        return {}
    result = profile(vlm, [data.images.load(i) for i in indices], repeats=30)
    result.pop("visual_tokens_per_image")
    return result


def visual_token_stats(vlm: VLM, features: FeatureCache, data: Dataset, limit: int = 512) -> dict[str, float]:
    images = sorted({s.image for s in data.samples if s.image is not None})[:limit]
    vlm.eval()
    counts = []
    with torch.no_grad():
        for start in range(0, len(images), 128):
            got = features.fetch(images[start : start + 128])
            if got.features is not None:  # (an AnyRes model merges each image's views: image_sizes)
                rows = len(got.image_sizes) if got.image_sizes is not None else got.features.patches.shape[0]
                inputs = VLMInputs([torch.tensor([0])] * rows, features=got.features, image_sizes=got.image_sizes)
                counts += vlm.visual_tokens(inputs).num_tokens.tolist()
    if not counts:
        return {}
    return {"mean": sum(counts) / len(counts), "min": min(counts), "max": max(counts)}


def record(
    cfg,
    vlm,
    out_dir,
    *,
    eval_sets,
    collators,
    features,
    train,
    train_stats,
    started,
    blind,
    log,
    precision,
    cache_info,
    commit: str | None = None,
    seconds: dict[str, Any] | None = None,
) -> dict:
    """Save the run's model, evaluate it, and write ``results.json``, ``summary.txt`` and ``<run>/hf``: ``cfg`` trained
    as ``vlm`` into ``out_dir``; the rest by name (what the run measured and loaded on its way). ``seconds``: where
    the run's wall time went before this (setup, blind baseline, each stage); the parts after it are added."""
    seconds = dict(seconds or {})
    tick = time.time()

    def timed(name: str) -> None:  # the seconds since the last part ended, as ``name``
        nonlocal tick
        seconds[name], tick = time.time() - tick, time.time()

    save_final(vlm, out_dir, len(train_stats))
    timed("save")
    metrics = {}
    for name, ds in eval_sets.items():  # each split's answers and its caption (or held-out) loss
        metrics[name] = evaluate_split(vlm, ds, collators[ds.images.key], cfg.eval_limit, blind[name])
        timed(f"evaluate {name}")
    first_eval = next(iter(eval_sets.values()))
    profile = cfg.profile if cfg.profile is not None else cfg.data.get("kind", "world") == "world"
    measured = efficiency(vlm, first_eval) if profile else {}
    timed("profile")
    tokens = visual_token_stats(vlm, features[first_eval.images.key], first_eval)
    timed("visual tokens")
    results = {
        "efficiency": measured,
        "precision": precision,
        "config": dataclasses.asdict(cfg),
        # each stage's settings as trained (a recipe's, written out): a sweep tells a recipe whose steps changed
        "stages": [dataclasses.asdict(s) for s in cfg.resolved_stages()],
        "backbones": world_backbones(cfg),  # the mini world's key and backbone recipes (None for published data)
        "backbone_bytes": backbone_bytes(vlm) if cfg.data.get("kind", "world") == "world" else None,
        "metrics": metrics,
        "visual_tokens_per_image": tokens,
        "parameters": {
            "trainable": sum(s["trainable_parameters"] for s in train_stats[-1:]),
            "connector": vlm.connector.num_parameters(),
            "total": sum(p.numel() for p in vlm.parameters()),
        },
        "training": [{k: v for k, v in s.items() if k != "history"} for s in train_stats],
        "memory": [s["memory"] for s in train_stats],
        "loss_history": [s["history"] for s in train_stats],
        "train_samples_per_second": train_stats[-1]["train_samples_per_second"],
        "wall_time_seconds": time.time() - started,
        # the parts of it: setup (data, backbones, model, features), blind, stageN, save, evaluate <split>, profile,
        # visual tokens (the export and summary after results.json are not in it)
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        # this process, this session (a resumed run counts from its restart)
        "seconds_to_first_step": (train_stats[0]["first_step_at"] - started)
        if train_stats[0]["first_step_at"]
        else None,
        # the tables of one encoder share a directory and its store: counted once
        "feature_cache": {
            **cache_info,
            "disk_bytes": sum(
                {id(f.store): f.store.disk_bytes() for f in features.values() if f.store is not None}.values()
            ),
        },
        "encoder_forwards": sum(f.forwards for f in features.values()),
        "skipped_samples": [item for ds in (train, *eval_sets.values()) for item in ds.skipped],
        "versions": versions(),
        "machine": machine_info(),  # the CPU (model, bf16 instruction sets), threads, GPU: what the timings ran on
        "git_commit": commit if commit is not None else git_commit(),  # the code the run started with
    }
    write_json(out_dir / "results.json", results)

    write_run_model(vlm, out_dir, results)  # <run>/hf: AutoModelForImageTextToText.from_pretrained reads it
    text = summary(results)
    with atomic_path(out_dir / "summary.txt") as tmp:
        tmp.write_text(text + "\n")
    log(text)
    return results


def save_final(vlm: VLM, out_dir: Path, num_stages: int) -> None:
    """The run's model: hard links to the last stage's final checkpoint when it holds these exact weights (a 7B
    stage-2 run then writes its weights once, not three times), else a fresh save."""
    last = out_dir / f"stage{num_stages}" / "checkpoint-last"
    try:
        state = read_json(last / "trainer_state.json")
        final = state["step"] == state["total_steps"]
    except (FileNotFoundError, ValueError, KeyError):
        final = False
    if not final:
        vlm.save(out_dir)
        return
    for name in (WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME):
        with atomic_path(out_dir / name) as tmp:
            link_or_copy(last / name, tmp)
    if (last / ADAPTER_DIR).is_dir():  # a LoRA run's adapters in peft's format
        with atomic_path(out_dir / ADAPTER_DIR) as tmp:
            link_tree(last / ADAPTER_DIR, tmp)
    elif vlm.llm.lora is not None:  # a sharded run's checkpoints hold them in trainable.safetensors only
        with atomic_path(out_dir / ADAPTER_DIR) as tmp:
            vlm.llm.save_adapter(tmp)


def backbone_bytes(vlm) -> dict[str, str | None]:
    """What the run's backbones were byte for byte: the SHA-256 (16 hex digits) of the ``manifest.json`` of the
    encoder's and the LLM's checkpoint directories, which lists every file's own SHA-256 (None for a checkpoint with
    no manifest). ``backbones`` names their recipes; two machines build one recipe into other bytes where their CPUs
    round differently, and two records on other bytes are two backbones, as two seeds are."""

    return {
        "encoder": manifest_digest(getattr(vlm.encoder, "checkpoint", None)),
        "llm": manifest_digest(getattr(vlm.llm, "checkpoint", None)),
    }


def manifest_digest(checkpoint: str | Path | None) -> str | None:
    """The SHA-256 (16 hex digits) of a checkpoint directory's ``manifest.json`` (None without one): what a record's
    ``backbone_bytes`` holds of each backbone."""
    manifest = Path(str(checkpoint)) / MANIFEST_NAME if checkpoint is not None else None
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest and manifest.is_file() else None


def summary(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"run: {cfg['encoder']['name']} + {cfg['connector']['name']} + {cfg['llm']['name']} "
        f"(recipe {cfg['recipe']}, seed {cfg['seed']})"
    ]
    for split, m in results["metrics"].items():
        if not m:
            lines.append(f"  {split:<14} not evaluated (eval_limit 0)")
            continue
        if "accuracy" in m:
            acc, blind = m["accuracy"], m["blind"]
            per = "  ".join(f"{k} {v:.2f}" for k, v in acc["per_type"].items())
            lines.append(
                f"  {split:<14} accuracy {acc['exact_match']:.3f}  (blind {blind['exact_match']:.3f})  "
                f"{questions(acc)}  | {per}"
            )
        else:  # every question of the split was dropped (unreadable images, too long): no score over nothing
            lines.append(f"  {split:<14} accuracy not evaluated (no usable question)")
        loss_key = "caption_loss" if "caption_loss" in m else "loss"
        lines.append(f"  {split:<14} {loss_key} {shown_loss(m[loss_key], 3)}")
    tok = results["visual_tokens_per_image"]
    if tok:
        lines.append(f"  visual tokens/image {tok['mean']:.1f} (min {tok['min']}, max {tok['max']})")
    p = results["parameters"]
    lines.append(
        f"  parameters: trainable {p['trainable']:,} / total {p['total']:,}; "
        f"train {results['train_samples_per_second']:.3g} samples/s; encoder forwards "
        f"{results['encoder_forwards']}; skipped {len(results['skipped_samples'])}; "
        f"wall {results['wall_time_seconds']:.0f} s"
    )
    if results.get("seconds"):  # (records from before December 7's evening have none)
        lines.append("  of it: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()))
    examples = next((m["examples"] for m in results["metrics"].values() if m.get("examples")), [])
    for ex in examples[:3]:
        lines.append(f"  e.g. {ex['question']!r}: {ex['answer']!r} (truth {ex['truth']!r}, blind {ex['blind']!r})")
    return "\n".join(lines)


class RunLog:
    """The run's log lines: to the console through ``echo`` (``print``; nothing under ``--quiet``) and, time-stamped,
    through ``logging`` to ``<run>/run.log`` (lines from before the directory exists are kept and written first).
    Only the main process of a multi-process run writes the file."""

    def __init__(self, out_dir: Path, echo):

        self.out_dir, self.echo, self.pending = Path(out_dir), echo, []
        self.logger = logging.getLogger(f"connector_zoo.run.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.handler = None
        self.main = int(os.environ.get("RANK", "0")) == 0

    def __call__(self, message: str) -> None:

        self.echo(message)
        if not self.main:
            return
        if self.handler is None and self.out_dir.is_dir():
            self.handler = logging.FileHandler(self.out_dir / "run.log", encoding="utf-8")
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.logger.addHandler(self.handler)
            pending, self.pending = self.pending, []
            for line in "\n".join(pending).splitlines():
                self.logger.info(line)
        if self.handler is None:
            self.pending.append(message)
        else:
            for line in message.splitlines() or [""]:  # every line time-stamped
                self.logger.info(line)

    def close(self) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
        self.handler, self.main = None, False  # closed: later lines go to the console only


def questions(acc: dict[str, Any]) -> str:
    """``1000 questions on 337 images`` (a record without the image count, older than it: the questions alone)."""
    images = acc.get("images")
    return f"{acc['count']} questions" + (f" on {images} images" if images else "")
