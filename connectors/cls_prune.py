"""``cls_prune``: FasterVLM's training-free [CLS]-attention visual-token pruning (Zhang et al. 2024, arXiv 2412.01818).

    score  = mean over heads of attentions[layer][:, :, 0, 1:]      (B, N): the CLS query row over the patch keys,
             of the *same* selected layer as the features (the encoder supplies it as ``cls_attention``)
    keep   = top-k of score, k = ``keep_tokens`` or round(``keep_ratio`` * N)
    tokens = inner(patches[keep])     kept tokens stay in their original raster order (a boolean mask, not score order)

The inner projector is any per-token connector (default ``mlp2x_gelu``). Pruning adds no parameters and needs no
training: ``CLSPrune.wrap(trained_projector, keep_ratio=...)`` (connectors/reduce.py) prunes an already-trained
linear/MLP projector at evaluation time, the paper's setting. For SigLIP, which has no CLS token, the encoder's
score is the attention of its attention-pooling probe over the final-layer patches; an encoder that gives no score is
refused by name.

Reported (LLaVA-1.5-7B, 10 benchmarks): keeping 432/288/144/58/29 of 576 tokens retains 100.18 / 100.12 / 98.75 /
94.24 / 89.41 % of the unpruned model.
"""

from __future__ import annotations

import torch

from connectors import register
from connectors.base import ConnectorOutput
from connectors.reduce import Reducer, check_keep, keep_count
from encoders.base import EncoderInfo, VisionFeatures


@register("cls_prune")
class CLSPrune(Reducer):
    """FasterVLM [CLS]-attention pruning: keep the top-k patches (raster order), then a per-token projector."""

    needs_cls_attention = True

    def configure(self, keep_ratio: float = 0.25, keep_tokens: int | None = None) -> None:
        check_keep("cls_prune", keep_ratio, keep_tokens)
        self.keep_ratio, self.keep_tokens = keep_ratio, keep_tokens

    def num_keep(self, num_patches: int) -> int:
        return keep_count(self.keep_ratio, self.keep_tokens, num_patches)

    def keep_mask(self, features: VisionFeatures) -> torch.Tensor:
        """(B, N) bool: the top-k patches by head-averaged CLS attention."""
        if features.cls_attention is None:
            raise ValueError(
                "cls_prune needs the encoder's CLS-attention scores; this encoder gave none (run it with "
                "with_cls_attention=True, or use an encoder that has a CLS token or a pooling probe)"
            )
        score = features.cls_attention.float().mean(dim=1)
        k = self.num_keep(score.shape[1])
        keep = torch.zeros_like(score, dtype=torch.bool)
        return keep.scatter(1, score.topk(k, dim=1).indices, True)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        keep = self.keep_mask(features)
        B, k = keep.shape[0], int(keep[0].sum())
        kept = features.patches[keep].view(B, k, -1)  # boolean indexing keeps raster order
        return ConnectorOutput.dense(self.inner.project(kept))

    def max_tokens(self, info: EncoderInfo) -> int:
        return self.num_keep(info.num_patches)
