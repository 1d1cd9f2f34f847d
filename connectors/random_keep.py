"""``random_keep``: keep k patch tokens chosen at random, raster order kept, then a per-token projector.

The control for every score-based pruner (``cls_prune``, VisionZip, PruMerge): a pruner whose choice of tokens beats
this one at the same k has a score worth its cost. FasterVLM and VisionZip report such random baselines.

    keep   = k positions drawn uniformly without replacement, per image; k = ``keep_tokens`` or round(``keep_ratio`` N)
    tokens = inner(patches[keep])     in raster order

At inference the draw is seeded (``seed``): image b of a batch gets the b-th permutation of a generator seeded with
``seed``, so an evaluation (whose batches are fixed) is reproducible. In training each forward draws anew from torch's
global generator, which the run seeds.
"""

from __future__ import annotations

import torch

from connector_zoo.settings import check
from connectors import register
from connectors.base import ConnectorOutput
from connectors.reduce import Reducer, check_keep, keep_count
from encoders.base import EncoderInfo, VisionFeatures


@register("random_keep")
class RandomKeep(Reducer):
    """Keep k random patches (raster order), then a per-token projector: the baseline of score-based pruning."""

    def configure(self, keep_ratio: float = 0.25, keep_tokens: int | None = None, seed: int = 0) -> None:
        check_keep("random_keep", keep_ratio, keep_tokens)
        check("random_keep", "seed", seed, int, lo=0)
        self.keep_ratio, self.keep_tokens, self.seed = keep_ratio, keep_tokens, seed

    def keep_mask(self, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
        """(B, N) bool with k True per row, at random positions."""
        k = keep_count(self.keep_ratio, self.keep_tokens, num_patches)
        generator = None if self.training else torch.Generator().manual_seed(self.seed)
        order = torch.stack([torch.randperm(num_patches, generator=generator) for _ in range(batch)])
        keep = torch.zeros(batch, num_patches, dtype=torch.bool)
        return keep.scatter(1, order[:, :k], True).to(device)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        B, N = features.patches.shape[:2]
        keep = self.keep_mask(B, N, features.patches.device)
        kept = features.patches[keep].view(B, int(keep[0].sum()), -1)  # boolean indexing keeps raster order
        return ConnectorOutput.dense(self.inner.project(kept))

    def max_tokens(self, info: EncoderInfo) -> int:
        return keep_count(self.keep_ratio, self.keep_tokens, info.num_patches)
