"""What one training stage trains (its settings: ``bench.train.settings.StageConfig``): which parameters (connector;
the LLM in stage 2, fully or through LoRA) and their optimizer groups (the connector's own learning rate)."""

from __future__ import annotations

from typing import Any

import torch

from bench.train.precision import upcast_trainable
from bench.train.settings import StageConfig
from connector_zoo.model.vlm import VLM
from connectors.base import paper_lr


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
    # AnyRes's image_newline trains with the connector, at its rate: it is the connector's side of the image
    own = {id(p) for p in vlm.connector.parameters()} | {id(p) for p in (vlm.tiling or torch.nn.Module()).parameters()}
    rate = paper_lr(vlm.connector, cfg.stage) if cfg.connector_lr == "paper" else cfg.connector_lr or cfg.lr
    groups = [
        {"params": [p for p in params if id(p) in own], "lr": rate, "name": "connector"},
        {"params": [p for p in params if id(p) not in own], "lr": cfg.lr, "name": "llm"},
    ]
    return [g for g in groups if g["params"]]
