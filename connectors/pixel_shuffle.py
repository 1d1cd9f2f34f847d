"""``pixel_shuffle``: space-to-depth over the patch grid, then an MLP (Idefics3, InternVL 1.5+, nanoVLM).

Each r x r block of neighbouring patches becomes one token whose features are the block's patches concatenated in
raster order inside the block (nanoVLM's ``pixel_shuffle``: ``(B, h, w, D) -> (B, h/r, r, w/r, r, D) -> permute ->
(B, h/r * w/r, r*r*D)``), so a token carries its neighbourhood and the count falls by r^2: 576 -> 144 at r = 2
(InternVL's scale 0.5), 729 -> 81 at r = 3 (Idefics3 with SigLIP-so400m/384). The projector is InternVL's
``mlp1``: LayerNorm(r^2 D) -> Linear -> GELU -> Linear (``layernorm=False``, ``depth=1``: nanoVLM's single linear map).

A grid side that ``factor`` does not divide is padded at the bottom and right with zero features to the next multiple
(27x27 at r = 2 -> 28x28 -> 196 tokens); choose r = 3 for 27x27 to avoid padding, as Idefics3 does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from connector_zoo.settings import check
from connectors import register
from connectors.base import Connector, ConnectorOutput
from encoders.base import EncoderInfo, VisionFeatures


@register("pixel_shuffle")
class PixelShuffle(Connector):
    """Space-to-depth by factor r (r x r neighbouring patches -> one token), then LayerNorm + MLP (InternVL)."""

    def __init__(self, in_dim: int, out_dim: int, factor: int = 2, depth: int = 2, layernorm: bool = True):
        super().__init__(in_dim, out_dim)
        check("pixel_shuffle", "factor", factor, int, lo=1, hi=8)
        check("pixel_shuffle", "depth", depth, int, lo=1)
        check("pixel_shuffle", "layernorm", layernorm, bool)
        self.factor = factor
        wide = in_dim * factor**2
        layers: list[nn.Module] = [nn.LayerNorm(wide)] if layernorm else []
        layers.append(nn.Linear(wide, out_dim))
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mlp = nn.Sequential(*layers)

    def shuffle(self, features: VisionFeatures) -> torch.Tensor:
        """(B, N, D) -> (B, ceil(h/r) * ceil(w/r), r*r*D), blocks in raster order, patches in raster order inside."""
        (h, w), r = features.grid, self.factor
        x = features.patches.reshape(features.batch_size, h, w, -1)
        H, W = math.ceil(h / r) * r, math.ceil(w / r) * r
        if (h, w) != (H, W):
            x = F.pad(x, (0, 0, 0, W - w, 0, H - h))
        x = x.reshape(x.shape[0], H // r, r, W // r, r, x.shape[-1]).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(x.shape[0], (H // r) * (W // r), r * r * x.shape[-1])

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        return ConnectorOutput.dense(self.mlp(self.shuffle(features)))

    def max_tokens(self, info: EncoderInfo) -> int:
        return math.prod(self.output_grid(*info.grid))

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return math.ceil(h / self.factor), math.ceil(w / self.factor)
