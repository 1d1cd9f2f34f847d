"""``avgpool``: spatial average pooling of the patch grid, then a per-token projector.

The plain locality-preserving reduction that LLaVA-style ablations compare against (Honeybee's and MobileVLM's
projectors pool too, with learned layers around the pooling; this one has none). The (h, w) grid is average-pooled to
an (h', w') grid by ``torch.nn.functional.adaptive_avg_pool2d`` (each output cell averages the patches of its region;
regions overlap by at most one patch when the sides do not divide), raster order:

    stride s    -> (h', w') = (ceil(h / s), ceil(w / s))          the default, s = 2: 24x24 -> 12x12 = 144 tokens
    keep_ratio r -> (h', w') = (round(h sqrt(r)), round(w sqrt(r)))  about r N tokens (the pruning curve's axis)
    tokens = inner(pooled patches)

Like ``cls_prune`` it has no parameters of its own: ``AvgPool.wrap(trained_projector, keep_ratio=...)`` pools in front
of an already-trained projector with no retraining.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from connector_zoo.settings import check
from connectors import register
from connectors.base import ConnectorOutput
from connectors.reduce import Reducer
from encoders.base import EncoderInfo, VisionFeatures


@register("avgpool")
class AvgPool(Reducer):
    """Average-pool the patch grid (stride, or a target fraction of the tokens), then a per-token projector."""

    def configure(self, stride: int = 2, keep_ratio: float | None = None) -> None:
        check("avgpool", "stride", stride, int, lo=1)
        check("avgpool", "keep_ratio", keep_ratio, float, lo=0, hi=1, lo_open=True, optional=True)
        self.stride, self.keep_ratio = stride, keep_ratio

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        if self.keep_ratio is not None:
            scale = math.sqrt(self.keep_ratio)
            return max(1, min(h, round(h * scale))), max(1, min(w, round(w * scale)))
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        h, w = features.grid
        grid = features.patches.transpose(1, 2).reshape(features.batch_size, -1, h, w)
        pooled = F.adaptive_avg_pool2d(grid, self.output_grid(h, w)).flatten(2).transpose(1, 2)
        return ConnectorOutput.dense(self.inner.project(pooled))

    def max_tokens(self, info: EncoderInfo) -> int:
        return math.prod(self.output_grid(*info.grid))
