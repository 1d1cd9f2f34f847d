"""``linear``: one ``Linear(Dv, D)`` applied to every visual token (LLaVA v1; MiniGPT-4's ``llama_proj``)."""

from __future__ import annotations

import torch
from torch import nn

from connectors import register
from connectors.base import PerTokenConnector


@register("linear")
class LinearConnector(PerTokenConnector):
    """Linear projection per token (LLaVA v1, MiniGPT-4's final layer)."""

    def __init__(self, in_dim: int, out_dim: int, feature_select: str = "patch"):
        super().__init__(in_dim, out_dim, feature_select)
        self.proj = nn.Linear(in_dim, out_dim)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)
