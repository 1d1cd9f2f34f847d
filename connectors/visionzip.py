"""``visionzip``: VisionZip's dominant + contextual tokens (Yang et al., CVPR 2025, arXiv 2412.04467;
dvlab-research/VisionZip ``visionzip/clip_encoder.py``), training-free, in front of a per-token projector.

    score      = sum over heads of the CLS attention over the patches (the selected layer's)
    dominant   = [CLS] + the top (dominant - 1) patches by score, in raster order   (no CLS: the top ``dominant``)
    rest       = the other patches, raster order; ``contextual`` targets = rest[0 :: max(1, len(rest) // contextual)]
    metric     = the selected block's attention keys, mean over heads (the reference's ``metric``)
    each non-target token joins its most similar target (cosine similarity of metrics); a contextual token is
                 target + mean(its members)          (exactly the reference: the target is added, not averaged in)
    tokens     = inner([dominant; contextual])

``visionzip(model, dominant=54, contextual=10)`` (the reference's README) keeps 64 tokens of 576: 54 dominant (CLS
included, ``dominant_num = dominant - 1`` patches) and 10 contextual; 191 + 30 = 221 and 108 + 20 = 128 are its
other settings. The similarity is the reference's, on the attention keys of the block that writes the selected layer
(``layers[-2]``'s ``metric`` there; the encoder gives them through ``feature_request``); ``keys=False`` measures it
on the layer's output features instead (what this project did before the encoder contract carried keys, and what an
encoder that gives no keys allows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from connector_zoo.settings import check
from connectors import register
from connectors.base import ConnectorOutput
from connectors.reduce import Reducer
from encoders.base import EncoderInfo, FeatureRequest, VisionFeatures


@register("visionzip")
class VisionZip(Reducer):
    """VisionZip: CLS-attention dominant tokens plus contextual tokens merged by similarity, then a projector."""

    #: the CPU mini world's 64 patches: 13 + 3 = 16 tokens, the paper's 54 : 10 split at a quarter of the patches
    small_settings = dict(dominant=13, contextual=3)

    needs_cls_attention = True

    def configure(self, dominant: int = 54, contextual: int = 10, keys: bool = True) -> None:
        check("visionzip", "dominant", dominant, int, lo=1)
        check("visionzip", "contextual", contextual, int, lo=0)
        check("visionzip", "keys", keys, bool)
        self.dominant, self.contextual, self.keys = dominant, contextual, keys

    @property
    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(cls_attention=True, keys="selected" if self.keys else None)

    def counts(self, num_patches: int, has_cls: bool) -> tuple[int, int]:
        """(dominant patches, contextual tokens) for a grid of ``num_patches``."""
        d = min(num_patches, self.dominant - 1 if has_cls else self.dominant)
        return d, min(self.contextual, num_patches - d)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        if features.cls_attention is None:
            raise ValueError("visionzip needs the encoder's CLS-attention scores; this encoder gave none")
        x, B = features.patches, features.batch_size
        d, c = self.counts(x.shape[1], features.cls is not None)
        score = features.cls_attention.float().sum(dim=1)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter(1, score.topk(d, dim=1).indices, True)
        parts = [features.cls[:, None]] if features.cls is not None else []
        parts.append(x[keep].view(B, d, -1))
        if c:
            rest = x[~keep].view(B, x.shape[1] - d, -1)
            metric = rest
            if self.keys:
                if features.keys is None:
                    raise ValueError(
                        "visionzip needs the selected block's attention keys (its feature_request); the "
                        "features carry none: use an encoder that gives them, or keys=False"
                    )
                metric = features.keys.float().mean(dim=2)[~keep].view(B, x.shape[1] - d, -1)
            step = max(1, rest.shape[1] // c)
            is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=x.device)
            is_target[torch.arange(0, rest.shape[1], step, device=x.device)[:c]] = True
            targets, members = rest[:, is_target], rest[:, ~is_target]
            unit = F.normalize(metric.float(), dim=-1)
            similarity = unit[:, ~is_target] @ unit[:, is_target].transpose(1, 2)
            assign = F.one_hot(similarity.argmax(dim=2), c).to(x.dtype)  # (B, members, c)
            counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
            parts.append(targets + assign.transpose(1, 2) @ members / counts)
        return ConnectorOutput.dense(self.inner.project(torch.cat(parts, dim=1)))

    def max_tokens(self, info: EncoderInfo) -> int:
        return sum(self.counts(info.num_patches, info.has_cls)) + int(info.has_cls)
