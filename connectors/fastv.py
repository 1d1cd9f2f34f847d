"""``fastv``: FastV's LLM-side visual-token pruning (Chen et al., ECCV 2024, arXiv 2403.06764; pkunlp-icler/FastV
``modeling_llama.py``, ``fastv_forward``), training-free, behind a per-token projector.

    every patch enters the LLM through the projector (``inner``, default mlp2x_gelu)
    after LLM layer K:  a   = attention of the last prompt position over the image tokens, mean over heads
                        keep = the top round(n (1 - R)) image tokens by a; the others are dropped from layers K+1..
    K = ``k`` (2), R = ``r`` (0.5): the paper's K=2, R=50 % setting

The pruning runs in the LLM through the backend's visual-token hook (llms/hooks.py); kept tokens keep their positions,
as FastV's in-place variant does. The LLM sees n visual tokens in its first K layers and round(n (1 - R)) after:
``bench tokens`` counts the n that enter.
"""

from __future__ import annotations

import torch

from connector_zoo.settings import check
from connectors import register
from connectors.base import ConnectorOutput
from connectors.reduce import Reducer
from encoders.base import EncoderInfo, VisionFeatures
from llms.hooks import VisualSpans, VisualTokenHook


class FastVHook(VisualTokenHook):
    def __init__(self, layer: int, ratio: float):
        self.layer, self.ratio = layer, ratio

    def keep_count(self, n: int) -> int:
        return round(n * (1 - self.ratio))

    def select(self, attention: torch.Tensor, spans: VisualSpans) -> torch.Tensor:
        drop = torch.zeros_like(attention, dtype=torch.bool)
        for b in range(attention.shape[0]):
            s, n = int(spans.start[b]), int(spans.length[b])
            if n == 0:
                continue
            keep = attention[b, s : s + n].topk(self.keep_count(n)).indices + s
            drop[b, s : s + n] = True
            drop[b, keep] = False
        return drop


@register("fastv")
class FastV(Reducer):
    """FastV: after LLM layer K, drop the R share of image tokens the last prompt position attends to least."""

    #: the CPU mini world's LLM has 2 decoder layers: prune after the first
    small_settings = dict(k=1)

    def configure(self, k: int = 2, r: float = 0.5) -> None:
        check("fastv", "k", k, int, lo=1)
        check("fastv", "r", r, float, lo=0, hi=1, hi_open=True)
        self.k, self.r = k, r
        self.llm_hook = FastVHook(k, r)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        return ConnectorOutput.dense(self.inner.project(features.patches))

    def max_tokens(self, info: EncoderInfo) -> int:
        return info.num_patches
