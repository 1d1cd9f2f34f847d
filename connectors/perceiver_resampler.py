"""``perceiver_resampler``: Flamingo's Perceiver Resampler (Alayrac et al. 2022, arXiv 2204.14198, Fig. 4 and
App. A.1.1; layer layout as in lucidrains/flamingo-pytorch and OpenFlamingo's ``helpers.py``).

    latents (L, Dv) learned                          L = ``num_latents`` = 64
    repeat ``depth`` (6) times:
        latents = latents + Attn(q = LN(latents), kv = [LN(x); LN(latents)])   heads 8 x dim_head 64, no biases
        latents = latents + FF(latents)             LN -> Linear(Dv, 4 Dv) -> GELU -> Linear(4 Dv, Dv), no biases
    tokens = Linear(Dv, D)(LN(latents))             64 tokens whatever the grid

The keys and values are the visual features *concatenated with the latents* (the paper's Fig. 4). Flamingo adds a
learned per-frame time embedding to the features; for one image it is a constant and is left out. The final linear map
to the LLM width stands where Flamingo feeds the latents to its gated cross-attention layers.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from connector_zoo.settings import check
from connectors import register
from connectors.base import Connector, ConnectorOutput
from encoders.base import EncoderInfo, VisionFeatures


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale, inner = heads, dim_head**-0.5, heads * dim_head
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = rearrange(self.to_q(latents), "b n (h d) -> b h n d", h=self.heads)
        k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        )
        attn = (q * self.scale @ k.transpose(-1, -2)).softmax(dim=-1)
        return self.to_out(rearrange(attn @ v, "b h n d -> b n (h d)"))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


@register("perceiver_resampler")
class PerceiverResampler(Connector):
    """Flamingo Perceiver Resampler: learned latents attend to [visual features; latents], then a linear map."""

    #: tests and the CPU mini world: 16 latents for 64 patches (a quarter, as the sweep's other reducers)
    small_settings = dict(num_latents=16, depth=2, heads=4, dim_head=32)

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 64,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
    ):
        super().__init__(in_dim, out_dim)
        for name, value in dict(
            num_latents=num_latents, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult
        ).items():
            check("perceiver_resampler", name, value, int, lo=1)
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, in_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(in_dim, heads, dim_head), feed_forward(in_dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        x = features.patches
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return ConnectorOutput.dense(self.proj(self.norm(latents)))

    def max_tokens(self, info: EncoderInfo) -> int:
        return self.num_latents
