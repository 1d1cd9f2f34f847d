"""``mlpNx_gelu``: LLaVA-1.5's projector, ``Linear(Dv, D) -> [GELU -> Linear(D, D)] x (N - 1)``.

Biases, no norm, no dropout, exactly LLaVA's ``builder.py`` (``^mlp(\\d+)x_gelu$``); ``mlp2x_gelu`` is the registered
name and any depth resolves through the pattern (``mlp3x_gelu`` -> depth 3). The layout of ``layers`` matches
LLaVA's ``nn.Sequential`` so its ``mm_projector`` weights load by index (``0`` and ``2`` for depth 2).
"""

from __future__ import annotations

import torch
from torch import nn

from connector_zoo.settings import check
from connectors import register
from connectors.base import PerTokenConnector


@register("mlp2x_gelu", pattern=r"mlp(?P<depth>\d+)x_gelu")
class MLPConnector(PerTokenConnector):
    """N-layer MLP with GELU per token (LLaVA-1.5 mlp2x_gelu; mlpNx_gelu for depth N)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, feature_select: str = "patch"):
        super().__init__(in_dim, out_dim, feature_select)
        check("mlp", "depth", depth, int, lo=1)
        self.depth = depth
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)
