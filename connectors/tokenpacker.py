"""``tokenpacker``: TokenPacker's point-to-region cross-attention (Li et al. 2024, arXiv 2407.02392;
CircleRadon/TokenPacker ``llava/model/multimodal_projector/builder.py``).

    q      = LN(Linear_nobias(bilinear_downsample(patches, 1/s)))     one coarse query per s x s region
    multi  = concat over ``key_layers`` of those layers' patch tokens  (L x Dv channels; the reference's 4 layers)
    k, v   = LN(MLP(multi)), LN(MLP(multi))                          MLP: Linear -> GELU -> Linear
    out    = MultiheadAttention(q, k, v) with each query attending only to the s*s patches of its own region
    tokens = Linear(E, D) -> GELU -> Linear(D, D) (out), raster order over the coarse grid

``scale_factor`` s = 2: 576 -> 144 tokens; s = 3: 576 -> 64. Defaults are the reference's: embed_dim 1024, 8 heads
(1024 // 128), LayerNorm eps 1e-6, truncated-normal(0.02) initialisation of the linear layers.

Compared line by line with the reference's ``builder.py``, ``clip_encoder.py`` and ``scripts/v1_5/*.sh``: the same
layers, norms (eps 1e-6), initialisation (trunc-normal(0.02) linear weights, zero biases; ``nn.MultiheadAttention``'s
in-projection keeps PyTorch's Xavier init, as there), region split and token order; ``tests/test_connectors_zoo.py``
computes the reference's forward (its ``divide_feature`` verbatim, the attention written out). What differs:

- *Multi-level keys* are the reference's: keys and values come from ``key_layers`` (default ``hidden_states[12, 16,
  22, 23]`` of CLIP-L's 24 blocks, concatenated to 4 x 1024 = 4,096 channels, the encoder asked for them through
  ``feature_request``), the queries from the selected layer (-2). In the mini world (a 3-block tower) the small
  settings take ``key_layers=(1, 2)``: the block below the selected layer and the selected one. ``key_layers=()``
  is the single-level variant this project ran before (keys, values and queries from the selected layer alone).
- *Grids s does not divide*: padded with zero patches that no query attends to (27x27 at s = 2 -> 14x14 queries,
  196 tokens); the reference refuses such grids.
- *Training recipe* (the harness's): TokenPacker pre-trains the projector at lr 1e-3 (LLaVA: 2e-3), no weight decay,
  3 % warm-up, cosine, batch 256, then fine-tunes projector + LLM at 2e-5 like LLaVA-1.5. The mini world's ``mini``
  recipe trains every connector at 2e-3 in both stages; ``mini-paper-rates`` takes 1e-3 / 2e-5 from ``paper_lr``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from connector_zoo.settings import SettingError, check
from connectors import register
from connectors.base import Connector, ConnectorOutput
from encoders.base import EncoderInfo, FeatureRequest, VisionFeatures


def gelu_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@register("tokenpacker")
class TokenPacker(Connector):
    """TokenPacker: coarse queries cross-attend to their own high-resolution region (point-to-region)."""

    #: tests and the CPU mini world (the defaults are the paper's real size; a 3-block tower has 2 levels to give)
    small_settings = dict(embed_dim=128, num_heads=4, key_layers=(1, 2))
    #: scripts/v1_5/pretrain.sh and finetune.sh
    paper_lr = {1: 1e-3, 2: 2e-5}

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        scale_factor: int = 2,
        embed_dim: int = 1024,
        num_heads: int = 8,
        key_layers: tuple[int, ...] | list[int] = (12, 16, 22, 23),
    ):
        super().__init__(in_dim, out_dim)
        check("tokenpacker", "scale_factor", scale_factor, int, lo=1, hi=8)
        check("tokenpacker", "embed_dim", embed_dim, int, lo=1)
        check("tokenpacker", "num_heads", num_heads, int, lo=1)
        if embed_dim % num_heads:
            raise SettingError(f"tokenpacker: num_heads={num_heads} must divide embed_dim={embed_dim}")
        if not isinstance(key_layers, (list, tuple)):
            raise SettingError(
                f"tokenpacker: key_layers must be a list of layer indices (transformers' hidden_states "
                f"indexing; [] for the selected layer alone), got {key_layers!r}"
            )
        for i in key_layers:
            check("tokenpacker", "key_layers[]", i, int)
        key_layers = tuple(key_layers)
        self.scale_factor, self.key_layers = scale_factor, key_layers
        key_dim = in_dim * (len(key_layers) if key_layers else 1)
        self.q_proj = nn.Linear(in_dim, embed_dim, bias=False)
        self.k_proj, self.v_proj = gelu_mlp(key_dim, embed_dim), gelu_mlp(key_dim, embed_dim)
        self.ln_q, self.ln_k, self.ln_v = (nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(3))
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(layers=self.key_layers)

    def coarse(self, h: int, w: int) -> tuple[int, int]:
        return math.ceil(h / self.scale_factor), math.ceil(w / self.scale_factor)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        (h, w), s, x = features.grid, self.scale_factor, features.patches
        gh, gw = self.coarse(h, w)
        q = F.interpolate(rearrange(x, "b (h w) d -> b d h w", h=h, w=w).float(), size=(gh, gw), mode="bilinear")
        q = self.ln_q(self.q_proj(rearrange(q.to(x.dtype), "b d h w -> b (h w) d")))
        multi = x
        if self.key_layers:
            if features.layers is None or features.layers.shape[1] != len(self.key_layers):
                raise ValueError(
                    f"tokenpacker needs the patch tokens of layers {list(self.key_layers)} (its "
                    "feature_request); the features carry none or another number of layers"
                )
            multi = rearrange(features.layers, "b l n d -> b n (l d)")  # the reference's torch.cat(dim=2)
        k, v = self.ln_k(self.k_proj(multi)), self.ln_v(self.v_proj(multi))
        kv = rearrange(torch.cat([k, v], -1), "b (h w) e -> b e h w", h=h, w=w)
        kv = F.pad(kv, (0, gw * s - w, 0, gh * s - h))  # zero patches where s does not divide a side
        kv = rearrange(kv, "b e (gh sh) (gw sw) -> (b gh gw) (sh sw) e", sh=s, sw=s)
        pad = torch.zeros(h, w, dtype=torch.bool, device=x.device)
        pad = F.pad(pad, (0, gw * s - w, 0, gh * s - h), value=True)
        pad = rearrange(pad, "(gh sh) (gw sw) -> (gh gw) (sh sw)", sh=s, sw=s).repeat(x.shape[0], 1)
        k, v = kv.chunk(2, dim=-1)
        out = self.attn(q.reshape(-1, 1, q.shape[-1]), k, v, key_padding_mask=pad, need_weights=False)[0]
        return ConnectorOutput.dense(self.mlp(out.reshape(x.shape[0], gh * gw, -1)))

    def max_tokens(self, info: EncoderInfo) -> int:
        return math.prod(self.coarse(*info.grid))

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return self.coarse(h, w)
