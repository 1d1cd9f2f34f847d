"""``bench run``: compose, train (stage 1, optionally stage 2), evaluate and record one configuration.

The run directory holds ``config.json`` (everything needed to reproduce it; the same settings as ``config.yaml``, which
``bench run --config`` reads), the trained model
(``vlm_config.json`` + ``trainable.safetensors``, and ``hf/`` for transformers), ``stageN/checkpoint-{last,best}``,
``results.json`` and ``summary.txt``. On the mini world, unset checkpoints mean the world's own pretrained miniature
backbones, named in ``backbones.json`` when the run starts (a resumed run must find the same ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

import connector_zoo.io
from bench.evaluate.accuracy import blind_baselines
from bench.run.lock import LOCK_NAME, writer_lock
from bench.run.record import RunLog, git_commit, record
from bench.train.assemble import (
    build_model,
    check_connector_settings,
    feature_sources,
    load_data,
    packing_decision,
    stage_samples,
)
from bench.train.precision import cpu_precision_decision, resolve_backbone_dtype
from bench.train.pretrain import world_backbones
from bench.train.settings import RunConfig
from bench.train.tracking import LOG_DIR, check_installed, eval_values
from bench.train.tracking import start as start_trackers
from bench.train.trainer import Trainer
from connector_zoo.io import read_json, write_json, write_text
from connector_zoo.model.precision import autocast, resolve_precision
from connector_zoo.model.vlm import VLM
from connector_zoo.registry import names_from_file


# --------------------------------------------------------------------- run
def run(
    cfg: RunConfig,
    out_dir: Path,
    resume: bool = False,
    log=print,
    allow_dotted_paths: bool = False,
    verify: bool = True,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and record ``cfg`` in ``out_dir``; ``resume`` continues the run found there (its
    config.json names only registered components unless ``allow_dotted_paths``; checkpoints are checked against
    their manifests unless not ``verify``). ``tracking``: ``group`` and ``tags`` for the experiment trackers (a
    sweep's name and a cell's settings)."""

    started, commit = time.time(), git_commit()  # the code this run starts with, whatever is committed meanwhile
    out_dir = Path(out_dir)
    fresh = not out_dir.exists()
    try:
        with writer_lock(out_dir):  # one writer per run directory (bench/run/lock.py)
            log = RunLog(out_dir, log)  # the console, and <run>/run.log
            try:
                return _run(cfg, out_dir, resume, log, allow_dotted_paths, verify, started, commit, tracking or {})
            finally:
                log.close()
    finally:  # a run that could not start leaves no directory behind (its lock file and log were all it held)
        if fresh and int(os.environ.get("RANK", "0")) == 0 and not (out_dir / "config.json").exists():
            for name in (LOCK_NAME, "run.log"):
                (out_dir / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out_dir.rmdir()


def _run(
    cfg: RunConfig,
    out_dir: Path,
    resume: bool,
    log,
    allow_dotted_paths: bool,
    verify: bool,
    started: float,
    commit: str | None,
    tracking: dict[str, Any],
) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    existing = (out_dir / "config.json").exists()

    def names():  # a run directory's config names only registered components unless the user opts in
        return names_from_file(out_dir / "config.json", allow_dotted_paths) if resume else contextlib.nullcontext()

    if resume:
        cfg = RunConfig.from_file(out_dir / "config.json")
        check_resumed_backbones(cfg, out_dir)  # (every process: one that raised alone would leave the others waiting)
        if not (out_dir / "config.yaml").exists():  # a run killed between its two settings files, or an older run
            write_text(out_dir / "config.yaml", cfg.yaml_text())
    elif existing:
        raise FileExistsError(f"{out_dir} already holds a run; use --resume to continue it or choose another --out")
    stages = cfg.resolved_stages()
    with names():
        check_connector_settings(cfg)  # seconds, before any data is read or backbone built
    # --precision auto on a CPU is measured on the run's own model once it is built (cpu_precision_decision); until
    # then, and for accelerate, fp32: the run's own autocast applies the decision
    auto_cpu = cfg.precision == "auto" and not torch.cuda.is_available()
    prec = resolve_precision(cfg.precision)
    backbone = resolve_backbone_dtype(cfg.backbone_dtype, prec)
    if cfg.precision == "fp16" and prec == "bf16":
        log("precision: fp16 autocast is not available on CPU through accelerate; running bf16 autocast")
    # on a machine without GPUs, processes started by torchrun / accelerate talk over gloo (DistributedType.MULTI_CPU)
    check_installed(cfg.report_to)  # before anything is written: a tracker that cannot run is one line now
    accelerator = Accelerator(
        mixed_precision=prec,
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=stages[0].grad_accum,
        log_with=cfg.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / LOG_DIR)),
    )
    for stage in stages:
        stage.resolve_accumulation(accelerator.num_processes)
    kind = accelerator.distributed_type.value
    where = "one process" if kind == "NO" else f"{accelerator.num_processes} processes ({kind})"
    compute = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[prec]
    if auto_cpu:
        compute = "auto (measured once the model is built)"
    kept = "; malloc keeps freed memory" if connector_zoo.io.FREED_MEMORY_KEPT else ""
    log(f"device: {accelerator.device.type}, {where}; compute {compute}, frozen weights stored in {backbone}{kept}")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and kind != "FSDP" and cfg.shard != "full":
        # measured with accelerate 1.15: on a machine without CUDA an FSDP config runs as DDP over gloo
        log(
            f"warning: an FSDP config was given but accelerate runs {kind} here (no CUDA): weights are replicated, "
            "not sharded; --shard full shards with FSDP2 on CPUs and GPUs alike"
        )
    if cfg.shard == "full" and accelerator.num_processes == 1:
        log("shard: full in one process: FSDP2's code path, nothing split (start several with torchrun or accelerate)")
    if cfg.shard == "full" and (cfg.qlora or backbone != "fp32"):
        raise ValueError(
            "--shard full needs the weights stored in fp32 (FSDP2's mixed precision computes in bf16 where "
            f"--precision asks): not --backbone-dtype {backbone}" + (" or --qlora" if cfg.qlora else "")
        )
    created = accelerator.is_main_process and not resume
    if created:  # first: a run killed while the world or backbones are built can be resumed
        write_json(out_dir / "config.json", dataclasses.asdict(cfg))
        write_text(out_dir / "config.yaml", cfg.yaml_text())  # the same settings for `bench run --config`
        if (backbones := world_backbones(cfg)) is not None:  # what it trains on, before a checkpoint holds any of it
            write_json(out_dir / BACKBONES_NAME, backbones)
    try:
        with accelerator.main_process_first():  # the main process builds the world and presets; others read them
            train, val, eval_sets, world = load_data(cfg, log)
            with names():
                vlm = build_model(cfg, world, log, backbone)
    except Exception:  # bad data or model: a run that cannot start leaves no directory claiming to be one
        if created:
            (out_dir / "config.json").unlink(missing_ok=True)
            (out_dir / "config.yaml").unlink(missing_ok=True)
            (out_dir / BACKBONES_NAME).unlink(missing_ok=True)
            log.close()
            (out_dir / "run.log").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    if cfg.init_connector:
        vlm.load_connector(cfg.init_connector, verify=verify)
        log(f"connector initialised from {cfg.init_connector}")
    features, collators, cache_info = feature_sources(cfg, vlm, [train, val, *eval_sets.values()], log)
    own_autocast, prec_why = "no", None  # the run's own autocast (accelerate's is fp32 under auto on a CPU)
    if auto_cpu:
        prec, prec_why = auto_cpu_precision(vlm, train, collators[train.images.key], stages[0], accelerator)
        own_autocast = prec
        log(f"precision: {'bf16 autocast' if prec == 'bf16' else 'fp32'} ({prec_why})")
    seconds: dict[str, Any] = {"setup": time.time() - started}  # where this process's wall time went (results.json)
    blind = {}
    if accelerator.is_main_process:  # before any training: the blind baseline is the LLM as loaded
        tick = time.time()
        with autocast(prec, vlm.device):
            by_split = {name: collators[ds.images.key] for name, ds in eval_sets.items()}
            blind = blind_baselines(vlm, eval_sets, by_split, cfg.eval_limit, cfg.feature_cache)
        seconds["blind"] = time.time() - tick
    pack, pack_why = packing_decision(cfg, vlm)
    log(f"packing: {'on' if pack else 'off'} ({pack_why})")
    start_trackers(accelerator, dataclasses.asdict(cfg), out_dir, tracking.get("group"), tracking.get("tags", []))
    if cfg.report_to:
        log(
            f"trackers: {', '.join(cfg.report_to)} (files under {out_dir / LOG_DIR} where the tracker keeps them there)"
        )
    train_stats: list[dict[str, Any]] = []
    offset = 0  # trackers count steps across the stages
    for index, stage in enumerate(stages, start=1):
        accelerator.gradient_accumulation_steps = stage.grad_accum
        stage_dir = out_dir / f"stage{index}"
        trainer = Trainer(
            vlm,
            stage_samples(train, stage.data),
            collators[train.images.key],
            stage,
            stage_dir,
            cfg.seed + index,
            val=stage_samples(val, stage.data) if val else None,
            val_collator=collators[val.images.key] if val else None,
            accelerator=accelerator,
            log=log,
            num_workers=cfg.num_workers,
            strict=cfg.strict,
            tracker_step_offset=offset,
            pack=pack,
            autocast=own_autocast,
            shard=cfg.shard,
            precision=prec,
        )
        last = stage_dir / "checkpoint-last"
        if resume and (last / "trainer_state.json").exists():
            trainer.resume(last, verify=verify)
        log(
            f"stage {index} ({'connector' if stage.stage == 1 else 'connector + LLM'}): {trainer.total_steps} steps "
            f"of {stage.batch_size * stage.grad_accum * accelerator.num_processes} samples, {group_rates(trainer)}"
        )
        tick = time.time()
        train_stats.append(trainer.fit() | {"history": trainer.history})
        seconds[f"stage{index}"] = time.time() - tick  # its steps, validation and checkpoints
        offset += trainer.total_steps
        vlm = accelerator.unwrap_model(trainer.model)
    if trainer.sharded:  # evaluated by rank 0 alone: the model as its last checkpoint holds it, whole
        last = trainer.out_dir / "checkpoint-last"
        vlm = trainer = None  # the shards and the optimizer state go before the whole model comes
        accelerator.free_memory()  # (accelerate's references to the prepared optimizer) + the garbage collector
        if accelerator.is_main_process:
            with names():
                vlm = VLM.load(last, allow_dotted_paths=allow_dotted_paths, verify=verify)
            vlm.to(accelerator.device)
            log("  the sharded model, gathered whole from its last checkpoint, is evaluated in one process")
    results = {}
    if accelerator.is_main_process:
        with autocast(prec, vlm.device):
            results = record(
                cfg,
                vlm,
                out_dir,
                eval_sets=eval_sets,
                collators=collators,
                features=features,
                train=train,
                train_stats=train_stats,
                started=started,
                blind=blind,
                log=log,
                precision={"compute": prec, "backbone": backbone, **({"why": prec_why} if prec_why else {})},
                cache_info=cache_info,
                commit=commit,
                seconds=seconds,
            )
        accelerator.log(eval_values(results.get("metrics", {})), step=offset)
    accelerator.wait_for_everyone()
    if cfg.report_to:  # trackers flushed and closed (accelerate's end_training also ends the process group: last)
        accelerator.end_training()
    return results


#: a mini-world run's backbones (``world_backbones``) as it started: a resumed run must train on the same ones
BACKBONES_NAME = "backbones.json"


def started_backbones(out_dir: Path) -> dict[str, str] | None:
    """The backbones the run in ``out_dir`` started on; None when it did not record them (a published-data run, or
    one started before December 7's evening)."""
    path = Path(out_dir) / BACKBONES_NAME
    return read_json(path) if path.exists() else None


def check_resumed_backbones(cfg: RunConfig, out_dir: Path) -> None:
    """A resumed mini-world run goes on only on the backbones it started on: its checkpoints were trained against
    them, and this code may build others now (a backbone recipe changed since)."""
    had, want = started_backbones(out_dir), world_backbones(cfg)
    if had is not None and had != want:
        raise ValueError(
            f"{out_dir} started on the backbones {had}; this code builds {want} for its settings, and resuming would "
            "train its checkpoints on other weights: start the run afresh in another --out"
        )


def auto_cpu_precision(vlm, train, collator, stage, accelerator) -> tuple[str, str]:
    """``--precision auto`` on a CPU: bf16 autocast or fp32, as a training step of this model on its first micro-batch
    runs faster (``cpu_precision_decision``), and why. Several processes keep fp32 (each would time its own share of a
    shared machine and might decide otherwise)."""
    if accelerator.num_processes > 1:
        return "no", "auto: fp32 with several processes (the probe times one)"
    batch = collator.batch(train.samples[: stage.batch_size])
    if batch.inputs is None:
        return "no", "auto: fp32 (no usable sample to time a step on)"
    precision, record = cpu_precision_decision(vlm, batch.inputs)
    return precision, record["why"]


def group_rates(trainer) -> str:
    """The peak rate of each of the trainer's optimizer groups, as the stage's first log line says them (``lr 0.002``
    for one group; ``lr: connector 0.0001, llm 5e-05`` when they differ: a recipe's ``connector_lr``, "paper" too)."""
    rates = {g.get("name", str(i)): g.get("initial_lr", g["lr"]) for i, g in enumerate(trainer.optimizer.param_groups)}
    if len(set(rates.values())) == 1:
        return f"lr {next(iter(rates.values())):g}"
    return "lr: " + ", ".join(f"{name} {rate:g}" for name, rate in rates.items())
