"""The training loop: accelerate for precision, accumulation and processes; exact resume; atomic checkpoints.

Stage 1 trains the connector only (encoder and LLM frozen); stage 2 trains connector + LLM. Cosine schedule with
linear warm-up (``min_lr_ratio`` floors it). The data order is a seeded permutation per epoch, and each optimizer step
takes the next ``batch_size * grad_accum * num_processes`` samples: process r, micro-step j takes slice
``j * num_processes + r``. So a 2-process run sees exactly the micro-batches of a 1-process run with twice the
accumulation, and the data position is a function of the step: resuming restores model, optimizer, scheduler, the
torch RNG and the step, and continues with the same samples. Batches come from data-loader workers
(``bench.data.loader``) in exactly that order.

Checkpoints (``checkpoint-last``, ``checkpoint-best`` by validation loss) are written to a temporary directory and
renamed into place, so a run killed at any moment leaves the previous complete checkpoint, never a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from bench.data.formats import BadSample, Dataset
from bench.data.loader import Collator, StepSampler, default_num_workers, make_loader
from bench.train.precision import memory_report, peak_memory_bytes
from bench.train.settings import StageConfig
from bench.train.sharding import (
    ensure_process_group,
    full_tensors,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
)
from bench.train.sharding import shard as shard_model
from bench.train.stage import parameter_groups, set_trainable
from bench.train.tracking import step_values
from connector_zoo.io import atomic_path, kill_point, link_tree, progress, show_progress
from connector_zoo.model.precision import autocast
from connector_zoo.model.vlm import VLM


class Trainer:
    def __init__(
        self,
        vlm: VLM,
        train: Dataset,
        collator: Collator,
        cfg: StageConfig,
        out_dir: Path,
        seed: int,
        val: Dataset | None = None,
        accelerator: Accelerator | None = None,
        log=print,
        num_workers: int | None = None,
        strict: bool = False,
        val_collator: Collator | None = None,
        tracker_step_offset: int = 0,
        pack: bool = False,
        autocast: str = "no",
        shard: str = "none",
        precision: str = "no",
    ):
        self.vlm, self.train_data, self.val_data, self.collator = vlm, train, val, collator
        # held-out samples index their own image table (the world's val split): its collator, not the training one
        self.val_collator = val_collator or collator
        self.cfg, self.out_dir, self.seed, self.log = cfg, Path(out_dir), seed, log
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.acc = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum)
        cfg.resolve_accumulation(self.acc.num_processes)  # a recipe's global batch, for however many processes
        self.acc.gradient_accumulation_steps = cfg.grad_accum
        params = set_trainable(vlm, cfg)
        self.num_trainable = sum(p.numel() for p in params)
        # FSDP2 where the run asks for it and the stage trains the LLM (one process: a process group of one, FSDP2's
        # code path with nothing to split)
        self.sharded = is_sharded(vlm)
        if shard == "full" and cfg.stage >= 2 and not self.sharded:
            vlm.to(self.acc.device)
            ensure_process_group(self.acc.device)
            groups = shard_model(vlm, precision)
            params = [p for p in vlm.parameters() if p.requires_grad]  # fully_shard made them DTensor parameters
            self.sharded = True
            n = self.acc.num_processes
            log(f"  sharded (FSDP2) over {n} process{'es' if n > 1 else ''}: {groups} decoder layers + the rest")
        optimizer = adamw(parameter_groups(vlm, params, cfg), cfg.lr, cfg.weight_decay)
        if self.sharded:  # accelerate would wrap the model in DDP: it prepares the optimizer only
            self.model, self.optimizer = vlm, self.acc.prepare(optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(vlm, optimizer)
        per_step = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        self.total_steps = (
            cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * len(train.samples) / per_step))
        )
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.inner_optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
            min_lr_rate=cfg.min_lr_ratio,
        )
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_val = float("inf")
        self.samples_seen = 0
        self.train_seconds = 0.0
        self.memory: dict[str, Any] = {}
        self.first_step_at: float | None = None  # wall clock at the end of this process's first optimizer step
        self.strict = strict
        self.tracker_step_offset = tracker_step_offset  # trackers count steps across stages (bench/train/tracking.py)
        self.pack = pack  # several samples per row (connector_zoo.model.vlm.VLM._pack)
        self.autocast = autocast  # the run's own autocast (--precision auto on a CPU), beside accelerate's

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer (accelerate wraps it)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    # -------------------------------------------------------------- data order
    def micro_indices(self, step: int, micro: int) -> list[int]:
        """Indices of the samples of process ``rank`` for micro-step ``micro`` of optimizer step ``step``."""
        cfg, world, rank = self.cfg, self.acc.num_processes, self.acc.process_index
        n = len(self.train_data.samples)
        per_step = cfg.batch_size * cfg.grad_accum * world
        start = step * per_step + (micro * world + rank) * cfg.batch_size
        out = []
        for k in range(start, start + cfg.batch_size):
            epoch, pos = divmod(k, n)
            out.append(self.permutation(epoch)[pos])
        return out

    def micro_batch(self, step: int, micro: int):
        """The samples of process ``rank`` for micro-step ``micro`` of optimizer step ``step``."""
        return [self.train_data.samples[i] for i in self.micro_indices(step, micro)]

    def permutation(self, epoch: int) -> list[int]:
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(len(self.train_data.samples), generator=g).tolist()
            if self.cfg.group_by_length:
                step = self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes
                perm = [i for k in range(0, len(perm), step) for i in sorted(perm[k : k + step], key=self.length)]
            self._perm, self._perm_epoch = perm, epoch
        return self._perm

    def length(self, index: int) -> int:
        sample = self.train_data.samples[index]
        try:
            text = len(self.collator.encode(sample))
        except BadSample:
            text = 0  # dropped from its batch when loaded
        return text + (self.collator.visual_budget if sample.image is not None else 0)

    # ------------------------------------------------------------------- train
    def fit(self) -> dict[str, Any]:
        self.model.train()
        sampler = StepSampler(self.micro_indices, self.step, self.total_steps, self.cfg.grad_accum)
        batches = iter(
            make_loader(self.train_data.samples, self.collator, sampler, self.num_workers)
            if self.step < self.total_steps
            else ()
        )
        bar = progress_bar(self.total_steps, self.step, f"stage {self.cfg.stage}", self.acc.is_main_process)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            losses, used, tokens, positions, grad_norm = [], 0, 0, 0, 0.0
            for _ in range(self.cfg.grad_accum):
                batch = self.collator.finish(next(batches))
                for sample_id, reason in batch.skipped:
                    self.train_data.skip(sample_id, reason, self.strict)
                with self.acc.accumulate(self.model):
                    if batch.inputs is None:  # every sample of this micro-batch was bad: a step of zero gradient
                        loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
                    else:
                        batch.inputs.pack = self.pack
                        with autocast(self.autocast, self.acc.device):
                            out = self.model(batch.inputs)
                        loss = out.loss
                        tokens += batch_tokens(batch.inputs, out.visual_tokens)
                        positions += int(out.positions)
                    self.acc.backward(loss)
                    if self.acc.sync_gradients:  # the norm before clipping (max_norm inf: measured, not clipped)
                        norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or math.inf)
                        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                if batch.inputs is not None:
                    losses.append(loss.detach())
                    used += len(batch)
            self.scheduler.step()
            if self.first_step_at is None:
                self.first_step_at = time.time()
            if not losses:
                losses.append(torch.tensor(float("nan"), device=self.acc.device))
            if not self.memory:  # after the first step: gradients and optimizer state exist
                self.memory = memory_report(self.model, self.inner_optimizer)
            loss = self.acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
            self.step += 1
            counts = self.acc.reduce(torch.tensor([used, tokens, positions], device=self.acc.device), reduction="sum")
            used, tokens, positions = (int(c) for c in counts.tolist())
            nominal = self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes
            if self.step == 1 and used < nominal / 2:  # say it now, not only in results.json
                why = skip_summary(self.train_data)
                self.log(f"warning: the first step used {used} of its {nominal} samples; {why}")
            self.samples_seen += used  # the samples trained on (a skipped one is not one)
            seconds = time.perf_counter() - t0
            self.train_seconds += seconds
            self.history.append(
                {
                    "step": self.step,
                    "loss": loss,
                    **self.rates(),
                    "grad_norm": grad_norm,
                    "samples_per_second": used / max(seconds, 1e-9),
                    "tokens_per_second": tokens / max(seconds, 1e-9),
                    # the share of the LLM's input positions that were padding (0 when every row is full)
                    "padding_share": 1 - tokens / positions if positions else 0.0,
                    "peak_memory_mb": peak_memory_bytes(self.acc.device) / 2**20,
                }
            )
            bar.set_postfix_str(
                f"loss {loss:.4f}, {self.samples_seen / max(self.train_seconds, 1e-9):.0f} samples/s", refresh=False
            )
            bar.update(1)
            if self.step % max(1, self.total_steps // 10) == 0 or self.step == self.total_steps:
                rates = self.history[-1]
                extra = f" (connector {rates['connector_lr']:.2e})" if "connector_lr" in rates else ""
                self.log(f"  step {self.step}/{self.total_steps}  loss {loss:.4f}  lr {rates['lr']:.2e}{extra}")
            evaluate_now = self.cfg.eval_every and self.step % self.cfg.eval_every == 0
            names = []
            if self.val_data is not None and (evaluate_now or self.step == self.total_steps) and self.validate():
                names.append("checkpoint-best")
            if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                names.insert(0, "checkpoint-last")
            self.acc.log(step_values(self.history[-1], self.cfg.stage), step=self.tracker_step_offset + self.step)
            self.save_checkpoints(names)
            kill_point(f"step:{self.cfg.stage}:{self.step}")  # tests: die like a killed job after this step
        bar.close()
        if self.history and self.samples_seen == 0:
            raise ValueError(f"stage {self.cfg.stage} trained on no usable sample; {skip_summary(self.train_data)}")
        return {
            "steps": self.step,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "best_val_loss": self.best_val if self.history else None,
            "train_samples_per_second": self.samples_seen / max(self.train_seconds, 1e-9),
            "trainable_parameters": self.num_trainable,
            "memory": self.memory,
            "gradient_checkpointing": self.cfg.gradient_checkpointing,
            "lora": self.cfg.lora,
            "first_step_at": self.first_step_at,
            "num_workers": self.num_workers,
            "packing": self.pack,
        }

    @torch.no_grad()
    def rates(self) -> dict[str, float]:
        """The learning rates now: ``lr`` the LLM's (the recipe's ``lr``; the connector's when it trains alone), and
        ``connector_lr`` beside it when the connector has a group of its own at another rate."""
        groups = self.optimizer.param_groups
        by_name = {g.get("name", str(i)): lr for i, (g, lr) in enumerate(zip(groups, self.scheduler.get_last_lr()))}
        out = {"lr": by_name.get("llm", next(iter(by_name.values())))}
        if "llm" in by_name and "connector" in by_name and self.cfg.connector_lr not in (None, self.cfg.lr):
            out["connector_lr"] = by_name["connector"]
        return out

    def validate(self) -> bool:
        """Validation loss at this step (recorded in the history); True when it is the best so far."""
        with self.acc.autocast(), autocast(self.autocast, self.acc.device):
            loss = validation_loss(
                self.acc.unwrap_model(self.model),
                self.val_data,
                self.val_collator,
                self.cfg.batch_size,
                self.cfg.val_limit,
            )
        self.history[-1]["val_loss"] = loss
        self.model.train()
        if loss is not None and loss < self.best_val:
            self.best_val = loss
            return True
        return False

    # ------------------------------------------------------------- checkpoints
    def save_checkpoints(self, names: list[str]) -> None:
        """Write the first checkpoint of ``names`` and hard-link its files under the others: best and last of the
        same step share their bytes instead of writing a 7B model's weights and optimizer state twice."""
        if not names:
            return
        self.acc.wait_for_everyone()
        vlm = self.acc.unwrap_model(self.model)
        weights = optimizer = None
        if self.sharded:  # every process takes part in gathering the shards; rank 0 writes them whole
            vlm.reshard()  # the root group stays gathered after a forward (a validation): its shards again
            weights = full_tensors(vlm.trainable_tensors())
            optimizer = optimizer_state(vlm, self.inner_optimizer)
        if not self.acc.is_main_process:
            return
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "best_val": self.best_val,
            "history": self.history,
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds,
            "stage": dataclasses.asdict(self.cfg),
        }
        first = self.out_dir / names[0]
        with atomic_path(first) as tmp:
            vlm.save(tmp, weights=weights)
            kill_point(f"checkpoint-write:{self.cfg.stage}:{self.step}")  # tests: weights written, not yet renamed
            torch.save(
                {
                    "optimizer": optimizer if optimizer is not None else self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                },
                tmp / "optimizer.pt",
            )
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        for name in names[1:]:
            link_copy(first, self.out_dir / name)

    def resume(self, directory: Path, verify: bool = True) -> None:
        """Restore model, optimizer, scheduler, RNG and step from a checkpoint written by ``save_checkpoint``."""
        state = json.loads((directory / "trainer_state.json").read_text())
        vlm = self.acc.unwrap_model(self.model)
        vlm.load_weights(directory, verify=verify)
        extra = torch.load(directory / "optimizer.pt", weights_only=True)
        # a sharded run's optimizer state is keyed by parameter name: it loads sharded or not, as does an unsharded one
        load_optimizer_state(vlm, self.inner_optimizer, extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        self.step, self.best_val, self.history = state["step"], state["best_val"], state["history"]
        self.samples_seen, self.train_seconds = state["samples_seen"], state["train_seconds"]
        self.log(f"  resumed at step {self.step}/{self.total_steps} from {directory}")


#: history fields measured on the clock or the process (they differ from one run of the same settings to the next)
MEASURED = ("samples_per_second", "tokens_per_second", "peak_memory_mb")


def batch_tokens(inputs, visual_tokens: torch.Tensor | None) -> int:
    """The tokens the LLM ran over for one micro-batch: text tokens (each ``<image>`` placeholder replaced by the
    connector's visual tokens) and no padding."""
    text = sum(len(ids) for ids in inputs.input_ids)
    placeholders = sum(inputs.has_image) if inputs.has_image else 0
    visual = int(visual_tokens.sum()) if visual_tokens is not None else 0
    return text - placeholders + visual


def link_copy(source: Path, target: Path) -> None:
    """Atomically make ``target`` a directory of hard links to ``source``'s files (a copy where links fail)."""
    with atomic_path(target) as tmp:
        link_tree(source, tmp)


def skip_summary(data: Dataset, top: int = 3) -> str:
    """The most frequent skip reasons of ``data`` with their counts (one line; quoted names, which differ from sample to
    sample, are shown as '...')."""

    counts = Counter(re.sub(r"'[^']*'", "'...'", s["reason"]) for s in data.skipped)
    if not counts:
        return "no sample was recorded as skipped"
    reasons = "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(top))
    return f"{len(data.skipped)} samples skipped so far, most often: {reasons}"


def adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where it has one for the parameters' device: one pass over each tensor in
    place of the per-parameter loop torch picks by default on a CPU (SmolLM2-135M's parameters: 0.13 against 0.33 s a
    step with the gradient clipping and ``zero_grad``, AMD EPYC, 2 threads; ``benchmarks/optimizer_step.py``). A
    sharded model's DTensor parameters and any parameter not of a floating type keep torch's default."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        type(p) is torch.nn.Parameter
        and p.is_floating_point()
        and p.device.type in _get_fused_kernels_supported_devices()
        and p.device == params[0].device
        for p in params
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


@torch.no_grad()
def validation_loss(vlm: VLM, data: Dataset, collator: Collator, batch_size: int, limit: int = 2000) -> float | None:
    """The mean LM loss over the first ``limit`` samples of ``data`` (batch-weighted); None when not one of them could
    be used (each skipped one is recorded with its reason): a loss over zero samples is no loss, not 0."""
    images = collator.features.images if collator.features is not None else None
    if images is not data.images:
        # a sample's image is an index into its own table: another table's collator would serve other images
        raise ValueError(
            f"validation of {data.name!r} needs the collator of its image table, not of "
            f"{images.key if images is not None else 'no images'!r}"
        )
    vlm.eval()
    total, count = 0.0, 0
    samples = data.samples[:limit]
    for start in range(0, len(samples), batch_size):
        batch = collator.batch(samples[start : start + batch_size])
        for sample_id, reason in batch.skipped:
            data.skip(sample_id, reason, strict=False)
        if batch.inputs is None:
            continue
        total += vlm(batch.inputs).lm_loss.item() * len(batch)
        count += len(batch)
    return total / count if count else None


def progress_bar(total: int, done: int, desc: str, main: bool):
    """A stage's bar on stderr (steps, loss, samples/s); off in other processes and under ``--quiet``
    (``TQDM_DISABLE=1``). The log lines every 10 % still go to the console and run.log."""
    # left on screen when done: the final count, loss and samples/s are drawn at close whatever the refresh rate
    return progress(
        total=total, initial=done, desc=desc, unit="step", leave=True, disable=not (main and show_progress())
    )
