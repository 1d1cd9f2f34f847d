"""``prumerge``: LLaVA-PruMerge's adaptive pruning and merging (Shang et al. 2024, arXiv 2403.15388;
42Shawn/LLaVA-PruMerge ``clip_encoder.py``, ``token_prune_merge_advanced``), training-free, before a projector.

    q, K    = the CLS query and the keys (full width C, heads concatenated) of the block that reads the selected
              layer (the reference's hooks on ``layers[23].self_attn.q_proj`` / ``k_proj`` with layer -2)
    a       = softmax(q [k_CLS; K]^T / sqrt(C))[1:]   one full-width attention row over the N patches
    ratio   = |{i : a_i > Q3 + 1.5 IQR}| / N       the IQR outlier rule (``adaptive``; else ``keep_ratio``, 1/8)
    keep    = the top int(N * ratio) patches by a, in score order (descending), as the reference
    kept_i  = x_i + sum over its ``neighbours`` (32) most similar other patches j (cosine of keys) of a_j x_j
    extra   = sum over the pruned patches j of a_j x_j                 one more token
    tokens  = inner([kept; extra])                  int(N * ratio) + 1 tokens, different per image (masked)

x are the selected layer's patch tokens. Quartiles are numpy's linear interpolation (``torch.quantile``), per image
(the reference's ``np.percentile`` runs over the whole batch at once; per image, a sample's tokens do not depend on
its batch-mates). A tower without a CLS token (SigLIP) has no CLS query: its attention-pooling probe's attention (mean
over heads, the encoder's ``cls_attention``) scores instead, and the keys still measure similarity. ``keys=False``:
the selected layer's per-head CLS attention (mean over heads) scores and its output features measure similarity
(what this project did before the encoder contract carried keys, and what an encoder that gives no keys allows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from connector_zoo.settings import check
from connectors import register
from connectors.base import ConnectorOutput
from connectors.reduce import Reducer
from encoders.base import EncoderInfo, FeatureRequest, VisionFeatures


def iqr_outlier_ratio(score: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B,) fraction of scores above Q3 + 1.5 IQR, per image."""
    q1, q3 = torch.quantile(score.float(), torch.tensor([0.25, 0.75], device=score.device), dim=1)
    return (score > (q3 + 1.5 * (q3 - q1))[:, None]).double().mean(dim=1)  # float64, as the reference's Python


@register("prumerge")
class PruMerge(Reducer):
    """LLaVA-PruMerge: keep the IQR outliers of CLS attention, merge neighbours into them, plus one pooled token."""

    needs_cls_attention = True

    def configure(
        self, adaptive: bool = True, keep_ratio: float = 0.125, neighbours: int = 32, keys: bool = True
    ) -> None:
        check("prumerge", "adaptive", adaptive, bool)
        check("prumerge", "keep_ratio", keep_ratio, float, lo=0, hi=1)
        check("prumerge", "neighbours", neighbours, int, lo=1)
        check("prumerge", "keys", keys, bool)
        self.adaptive, self.keep_ratio, self.neighbours, self.keys = adaptive, keep_ratio, neighbours, keys

    @property
    def feature_request(self) -> FeatureRequest:
        # the CLS attention too: a tower without a CLS token (SigLIP) has no CLS query, and its probe scores instead
        return FeatureRequest(cls_attention=True, keys="next" if self.keys else None)

    def scores(self, features: VisionFeatures, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (B, N), the similarity metric (B, N, ·)) as the reference computes them, or the fallback's."""
        if not self.keys:
            if features.cls_attention is None:
                raise ValueError(
                    "prumerge (keys=False) needs the encoder's CLS-attention scores; this encoder gave none"
                )
            return features.cls_attention.to(work).mean(dim=1), features.patches.to(work)
        if features.keys is None:
            raise ValueError(
                "prumerge needs the attention keys of the block after the selected layer (its "
                "feature_request); the features carry none (an encoder that gives no keys): use "
                "keys=False"
            )
        keys = features.keys.to(work).flatten(2)  # (B, N, C): full width, as the reference's k_proj output
        if features.cls_qk is None:  # no CLS token (SigLIP): its attention-pooling probe scores, keys still merge
            if features.cls_attention is None:
                raise ValueError("prumerge: this encoder has no CLS token and gave no CLS-attention score")
            return features.cls_attention.to(work).mean(dim=1), keys
        q, k_cls = features.cls_qk.to(work).flatten(2).unbind(1)
        logits = torch.cat([(q * k_cls).sum(-1, keepdim=True), (keys @ q[:, :, None])[..., 0]], dim=1)  # (B, 1 + N)
        return torch.softmax(logits * keys.shape[-1] ** -0.5, dim=1)[:, 1:], keys

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        x, (B, N) = features.patches, features.patches.shape[:2]
        work = torch.promote_types(x.dtype, torch.float32)  # scores and sums at least in fp32 (bf16 features)
        score, metric = self.scores(features, work)
        x = x.to(work)
        ratio = iqr_outlier_ratio(score) if self.adaptive else torch.full((B,), self.keep_ratio, dtype=torch.float64)
        unit = F.normalize(metric, dim=-1)
        out = []
        for b in range(B):
            k = int(N * float(ratio[b]))
            idx = score[b].topk(k).indices
            sim = unit[b, idx] @ unit[b].T  # (k, N); a patch is not its own neighbour
            sim[torch.arange(k), idx] = float("-inf")
            near = sim.topk(min(self.neighbours, N - 1), dim=1).indices
            kept = x[b, idx] + (score[b, near, None] * x[b, near]).sum(dim=1)
            pruned = torch.ones(N, dtype=torch.bool, device=x.device)
            pruned[idx] = False
            extra = (score[b, pruned, None] * x[b, pruned]).sum(dim=0, keepdim=True)
            out.append(self.inner.project(torch.cat([kept, extra]).to(features.patches.dtype)))
        tokens = torch.nn.utils.rnn.pad_sequence(out, batch_first=True)
        lengths = torch.tensor([len(t) for t in out], device=x.device)
        mask = torch.arange(tokens.shape[1], device=x.device)[None] < lengths[:, None]
        return ConnectorOutput(tokens, mask)

    def max_tokens(self, info: EncoderInfo) -> int:
        return info.num_patches + 1
