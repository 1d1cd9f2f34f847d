"""One training stage's settings (``StageConfig``, range-checked) and what it trains: which parameters
(connector; the LLM in stage 2, fully or through LoRA) and their optimizer groups (the connector's own learning
rate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bench.train.precision import upcast_trainable
from connector_zoo.model.vlm import VLM
from connector_zoo.settings import check, check_choice
from connectors.base import paper_lr


@dataclass
class StageConfig:
    """One training stage: ``steps`` optimizer steps (0: none, the stage is skipped), or ``epochs`` over the data when
    ``steps`` is None. Every setting is range-checked on construction (recipes, ``--steps``, a run's config.json)."""

    stage: int = 1
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    #: when set, the accumulation is derived: global_batch = batch_size x grad_accum x processes (recipes of the
    #: papers name the global batch; the same recipe then holds on 1 GPU or 8)
    global_batch: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps between validation-loss checks (0: at the end only)
    save_every: int = 100
    #: which samples this stage trains on: "all", or only "captions" / "questions" (mini world sample types)
    data: str = "all"
    #: sort the samples of each optimizer step by length, so micro-batches pad less (LLaVA's length grouping)
    group_by_length: bool = False
    #: recompute the LLM's activations in the backward pass (less memory, ~1/3 more compute); the LLM's own
    #: transformers gradient checkpointing, non-reentrant, so a frozen LLM still passes gradients to the connector
    gradient_checkpointing: bool = False
    #: the connector's learning rate when it differs from ``lr`` (LLaVA-1.5 LoRA: lr 2e-4, projector 2e-5), or
    #: "paper": the rate the connector's paper trains it with in this stage (``Connector.paper_lr``)
    connector_lr: float | str | None = None
    #: LoRA adapters on the LLM in a stage that trains it (``r``, ``alpha``, ``dropout``, ``targets``), or None
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        who = f"stage {self.stage}"
        check(who, "stage", self.stage, int, lo=1, hi=2)
        check(who, "steps", self.steps, int, lo=0, optional=True)
        check(who, "epochs", self.epochs, float, lo=0, lo_open=True)
        for name in ("batch_size", "grad_accum", "save_every"):
            check(who, name, getattr(self, name), int, lo=1)
        check(who, "global_batch", self.global_batch, int, lo=1, optional=True)
        check(who, "lr", self.lr, float, lo=0, lo_open=True)
        if self.connector_lr != "paper":
            check(who, "connector_lr", self.connector_lr, float, lo=0, lo_open=True, optional=True)
        check(who, "weight_decay", self.weight_decay, float, lo=0)
        check(who, "warmup_ratio", self.warmup_ratio, float, lo=0, hi=1)
        check(who, "min_lr_ratio", self.min_lr_ratio, float, lo=0, hi=1)
        check(who, "max_grad_norm", self.max_grad_norm, float, lo=0)
        check(who, "eval_every", self.eval_every, int, lo=0)
        check_choice(who, "data", self.data, ("all", "captions", "questions"))
        check(who, "group_by_length", self.group_by_length, bool)
        check(who, "gradient_checkpointing", self.gradient_checkpointing, bool)
        check(who, "lora", self.lora, dict, optional=True)

    def resolve_accumulation(self, num_processes: int) -> None:
        """Set ``grad_accum`` from ``global_batch`` for this number of processes (no-op when it is not set)."""
        if self.global_batch is None:
            return
        per_step = self.batch_size * num_processes
        if self.global_batch % per_step:
            raise ValueError(
                f"global batch {self.global_batch} is not a multiple of batch {self.batch_size} x {num_processes} "
                f"processes; choose a --batch-size that divides {self.global_batch // num_processes}"
            )
        self.grad_accum = self.global_batch // per_step


def set_trainable(vlm: VLM, cfg: StageConfig) -> list[torch.nn.Parameter]:
    """Stage 1: connector only. Stage 2: connector and LLM (or the LLM's LoRA adapters). The encoder stays frozen.

    Trainable parameters are made fp32 (master weights) whatever dtype the backbone was loaded in."""
    vlm.encoder.freeze(True)
    trains_llm = cfg.stage >= 2
    if trains_llm and cfg.lora:
        vlm.llm.add_lora(cfg.lora)
        vlm.llm.model.requires_grad_(False)
        for p in vlm.llm.lora_parameters():
            p.requires_grad_(True)
    else:
        vlm.llm.model.requires_grad_(trains_llm)
    vlm.llm.frozen = not trains_llm
    model = vlm.llm.model
    # transformers >= 5.x names it activation checkpointing; older 5.x releases only have the gradient_* names
    new_api = hasattr(model, "activation_checkpointing_enable")
    disable = model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if new_api:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif getattr(model, "supports_gradient_checkpointing", False):
        disable()
    # parameters a connector froze on purpose (e.g. a MiniGPT-4 Q-Former) keep requires_grad=False
    params = [p for p in vlm.parameters() if p.requires_grad]
    upcast_trainable(params)
    return params


def parameter_groups(vlm: VLM, params: list[torch.nn.Parameter], cfg: StageConfig) -> list[dict[str, Any]]:
    """One AdamW group for the connector (at ``connector_lr`` when set; "paper": its paper's rate for this stage) and
    one for the rest (LLM or adapters)."""
    own = {id(p) for p in vlm.connector.parameters()}
    rate = paper_lr(vlm.connector, cfg.stage) if cfg.connector_lr == "paper" else cfg.connector_lr or cfg.lr
    groups = [
        {"params": [p for p in params if id(p) in own], "lr": rate, "name": "connector"},
        {"params": [p for p in params if id(p) not in own], "lr": cfg.lr, "name": "llm"},
    ]
    return [g for g in groups if g["params"]]
