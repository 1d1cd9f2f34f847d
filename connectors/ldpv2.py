"""``ldpv2``: MobileVLM V2's lightweight downsample projector (Chu et al. 2024, arXiv 2402.03766;
Meituan-AutoML/MobileVLM ``mobilevlm/model/vision_projector.py``, ``LDPNetV2Projector``).

    x      = Linear(Dv, D) -> GELU -> Linear(D, D)        per patch ("feature transformation")
    x      = AdaptiveAvgPool2d(12, 12)(x as a (h, w) map)  token reduction: 24x24 -> 12x12 = 144 (2x2 average pooling)
    tokens = x + DepthwiseConv3x3(x)                      PEG, positional information (bias, groups = D), raster order

``grid`` is the output side (the reference hard-codes (12, 12): 576 -> 144, and 729 -> 144 at 27x27). A patch grid
smaller than ``grid`` is not pooled up (the reference's adaptive pooling would repeat patches): its side is kept.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import nn

from connector_zoo.settings import check
from connectors import register
from connectors.base import Connector, ConnectorOutput
from encoders.base import EncoderInfo, VisionFeatures


@register("ldpv2")
class LDPv2(Connector):
    """MobileVLM V2 LDPv2: point-wise MLP -> average pooling to a 12x12 grid -> PEG (depth-wise conv + residual)."""

    #: the CPU mini world: 8x8 -> 4x4, the paper's 2x2 pooling
    small_settings = dict(grid=4)

    def __init__(self, in_dim: int, out_dim: int, grid: int = 12):
        super().__init__(in_dim, out_dim)
        check("ldpv2", "grid", grid, int, lo=1)
        self.grid = grid
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.peg = nn.Conv2d(out_dim, out_dim, 3, 1, 1, bias=True, groups=out_dim)

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return min(self.grid, h), min(self.grid, w)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        h, w = features.grid
        x = rearrange(self.mlp(features.patches), "b (h w) d -> b d h w", h=h, w=w)
        x = F.adaptive_avg_pool2d(x, self.output_grid(h, w))
        x = self.peg(x) + x
        return ConnectorOutput.dense(rearrange(x, "b d h w -> b (h w) d"))

    def max_tokens(self, info: EncoderInfo) -> int:
        h, w = self.output_grid(*info.grid)
        return h * w
