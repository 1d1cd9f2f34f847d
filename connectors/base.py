"""The connector contract.

A connector maps the encoder's :class:`~encoders.base.VisionFeatures` to visual tokens of the LLM's width D **and a
per-sample mask**, because some connectors (cls_prune by ratio over padded batches, focus_moe) emit a different number
of tokens per image. Tokens of a sample are left-aligned: ``mask[b, :count[b]]`` is True and the rest is padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from connector_zoo.settings import check_choice
from encoders.base import EncoderInfo, FeatureRequest, VisionFeatures


@dataclass
class ConnectorOutput:
    """tokens (B, T, D); mask (B, T) bool, True for real tokens; aux_loss: a scalar added to the LM loss, or None."""

    tokens: torch.Tensor
    mask: torch.Tensor
    aux_loss: torch.Tensor | None = None

    @property
    def num_tokens(self) -> torch.Tensor:
        """(B,) visual tokens per sample."""
        return self.mask.sum(dim=1)

    @staticmethod
    def dense(tokens: torch.Tensor) -> ConnectorOutput:
        return ConnectorOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


#: LLaVA-1.5's projector rates (stage 1 feature alignment, stage 2 instruction tuning), the default of ``paper_lr``
PAPER_LR: dict[int, float] = {1: 2e-3, 2: 2e-5}


def paper_lr(connector: nn.Module, stage: int) -> float:
    """The rate ``connector``'s paper trains it with in ``stage`` (LLaVA-1.5's where the paper does not differ)."""
    return {**PAPER_LR, **getattr(connector, "paper_lr", {})}[stage]


def constructor_settings(cls: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The settings in ``cls(in_dim, out_dim, *args, **kwargs)``'s call, by parameter name (``**kwargs`` flattened);
    empty when the call does not fit the signature (the constructor then raises its own error)."""
    signature = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return {}
    settings: dict[str, Any] = {}
    for key, value in list(bound.arguments.items())[3:]:  # after self, in_dim, out_dim
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            settings.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            settings[key] = value
    return settings


class Connector(nn.Module):
    """Base class of every connector: ``Connector(in_dim, out_dim, **settings)(features) -> ConnectorOutput``."""

    registered_name: str = ""
    #: the encoder must return ``cls_attention`` (FasterVLM-style pruning); ``feature_request`` says the rest
    needs_cls_attention: bool = False
    #: the connector's learning rate per training stage as its paper trains it, where it differs from LLaVA-1.5's
    #: projector (stage 1 2e-3, stage 2 2e-5; ``PAPER_LR``); a recipe stage with ``connector_lr="paper"`` uses it
    paper_lr: dict[int, float] = {}

    def __new__(cls, *args: Any, **kwargs: Any):
        # the settings this connector is built with, taken from its own constructor's arguments, so that a connector
        # built directly (``MLPConnector(16, 32, depth=3)``) records what it is, as one built by name does
        self = super().__new__(cls)
        object.__setattr__(self, "_built_with", constructor_settings(cls, args, kwargs))
        return self

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        own_name = type(self).__dict__.get("registered_name")  # a subclass does not inherit its parent's name
        name = own_name or f"{type(self).__module__}:{type(self).__qualname__}"
        #: what rebuilds this connector (``build_connector(**spec)`` with the dims): its name and its settings
        self.spec: dict[str, Any] = {"name": name, **getattr(self, "_built_with", {})}

    @property
    def feature_request(self) -> FeatureRequest:
        """What this connector needs of the encoder beyond the selected layer (CLS attention, further layers,
        attention keys); the encoder computes, and the feature cache stores, exactly that."""
        return FeatureRequest(cls_attention=self.needs_cls_attention)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        raise NotImplementedError

    def max_tokens(self, info: EncoderInfo) -> int:
        """Upper bound on the tokens per image for an encoder (the LLM's context budget is checked against it)."""
        return info.num_patches + int(info.has_cls)

    def output_grid(self, h: int, w: int) -> tuple[int, int] | None:
        """The (rows, columns) grid that this connector's tokens form, in raster order, for an ``h x w`` patch grid;
        None when they form none (learned queries, a selection of patches). AnyRes lays a grid connector's tiles out
        as one image, removes the padding's rows or columns and ends each row with a newline token
        (``connector_zoo/model/tiling.py``); the tokens of a connector without a grid are concatenated view by
        view."""
        return None

    @torch.no_grad()
    def num_visual_tokens(self, features: VisionFeatures) -> torch.Tensor:
        """(B,) tokens this connector emits for these features."""
        return self(features).num_tokens

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class PerTokenConnector(Connector):
    """A connector that maps every selected token on its own (linear, MLP): usable inside ``cls_prune``.

    ``feature_select``: ``"patch"`` (LLaVA's default: patch tokens only) or ``"cls_patch"`` (CLS first, then patches;
    for encoders without CLS, such as SigLIP, both are the patch tokens).
    """

    def __init__(self, in_dim: int, out_dim: int, feature_select: str = "patch"):
        super().__init__(in_dim, out_dim)
        owner = self.registered_name or type(self).__name__
        check_choice(owner, "feature_select", feature_select, ("patch", "cls_patch"))
        self.feature_select = feature_select

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) -> (B, N, out_dim)."""
        raise NotImplementedError

    def select(self, features: VisionFeatures) -> torch.Tensor:
        if self.feature_select == "cls_patch" and features.cls is not None:
            return torch.cat([features.cls[:, None], features.patches], dim=1)
        return features.patches

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        return ConnectorOutput.dense(self.project(self.select(features)))

    def max_tokens(self, info: EncoderInfo) -> int:
        return info.num_patches + int(info.has_cls and self.feature_select == "cls_patch")

    def output_grid(self, h: int, w: int) -> tuple[int, int] | None:
        # with the CLS token in front the tokens are no grid (LLaVA-NeXT's AnyRes takes the patches only)
        return (h, w) if self.feature_select == "patch" else None
