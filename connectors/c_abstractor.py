"""``c_abstractor``: Honeybee's C-Abstractor (Cha et al., CVPR 2024, arXiv 2312.06742; kakaobrain/honeybee
``honeybee/projectors/projectors.py``, config ``configs/model_config/c-abs.yaml``).

    x      = patches + pos_emb                                   learned, one per patch (``pos_emb=True``)
    x      = RegStage(depth, Dv -> hidden)(x as a (h, w) map)    timm's RegNet stage: SiLU, LayerNorm2d, stride 1
    x      = AdaptiveAvgPool2d(sqrt(M), sqrt(M))(x)              M = ``num_queries`` tokens, a square number
    x      = RegStage(depth, hidden -> hidden)(x)
    tokens = MLP(mlp_depth, hidden -> D)(x), SiLU between layers, raster order

Defaults are the paper's (c-abs.yaml): M = 144, depth 3, mlp_depth 2, hidden 1024, positional embedding on, no
prenorm, no extra eos tokens. The blocks are ``timm.models.regnet.RegStage`` exactly as Honeybee builds them, and the
weights start as Honeybee's do: its ``HoneybeePreTrainedModel._init_weights`` (run by ``post_init`` over the
abstractor) draws every Conv2d and Linear weight from N(0, 0.02) with zero biases; the position table is
trunc-normal(0.02). ``tests/test_connectors_zoo.py`` computes the reference's forward from its equations.

Compared line by line with ``projectors.py``, ``modeling_honeybee.py`` and the configs, what differs, on purpose:

- *Position table at other grids*: learned for a ``pos_grid`` x ``pos_grid`` patch grid (24: CLIP-L/336) and
  resampled bicubically for other grids (timm's ``resample_abs_pos_embed``, as ViTs do at a new resolution);
  Honeybee's table is tied to its encoder. Grids smaller than sqrt(M) are pooled up to M tokens by the adaptive
  pooling, as in the reference; choose ``num_queries`` for such grids (the mini world's 8x8 grid: 16).
- *Encoder layer*: Honeybee reads CLIP's *last* layer (``feature_layer_index: -1``, CLS dropped, no post-LN); the
  zoo's encoders default to LLaVA's penultimate (``--layer -1`` gives Honeybee's).
- *Training recipe* (not this module's, the harness's): Honeybee pre-trains the abstractor alone at lr 1e-4 (AdamW
  betas 0.9 / 0.98, eps 1e-6, weight decay 0.01, 2,000 warm-up steps of 50,000, cosine to 1e-5, batch 256) and
  fine-tunes abstractor + LLM at 2e-5 (weight decay 1e-4). The mini world's default recipe, ``mini``, trains every
  connector at LLaVA's stage-1 rate 2e-3 in both stages (no weight decay); ``mini-paper-rates`` takes Honeybee's 1e-4
  / 2e-5 from ``paper_lr``. What each does to this module is in docs/mini-world.md (issue 31).
- Before December 5 the blocks and the MLP kept timm's / PyTorch's default initialisation (Kaiming-uniform, weights
  of std 0.07-0.19 here, non-zero biases), which is not Honeybee's.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from einops import rearrange
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from timm.models.regnet import RegStage
from torch import nn

from connector_zoo.settings import SettingError, check
from connectors import register
from connectors.base import Connector, ConnectorOutput
from encoders.base import EncoderInfo, VisionFeatures


def silu_mlp(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    """Honeybee's ``build_mlp``: Linear, then (SiLU, Linear) x (depth - 1)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def honeybee_init(m: nn.Module) -> None:
    """``HoneybeePreTrainedModel._init_weights``, which the model's ``post_init`` applies to the abstractor: every
    Conv2d and Linear weight N(0, 0.02) with zero biases (SE's 1x1 convs included), LayerNorms 1 / 0."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register("c_abstractor")
class CAbstractor(Connector):
    """Honeybee C-Abstractor: ResNet (RegNet) blocks -> adaptive average pooling to M tokens -> blocks -> MLP."""

    #: tests and the CPU mini world (8x8 patches -> 4x4 tokens, the paper's 576 -> 144 ratio); defaults are the paper's
    small_settings = dict(num_queries=16, hidden_size=128, pos_grid=8)
    #: Honeybee's pretrain.yaml (the abstractor alone) and finetune.yaml (abstractor + LLM)
    paper_lr = {1: 1e-4, 2: 2e-5}

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 144,
        depth: int = 3,
        mlp_depth: int = 2,
        hidden_size: int = 1024,
        pos_emb: bool = True,
        pos_grid: int = 24,
    ):
        super().__init__(in_dim, out_dim)
        check("c_abstractor", "num_queries", num_queries, int, lo=1)
        if math.isqrt(num_queries) ** 2 != num_queries:
            raise SettingError(f"c_abstractor: num_queries={num_queries} must be a square number (144 = 12x12)")
        check("c_abstractor", "depth", depth, int, lo=0)
        check("c_abstractor", "mlp_depth", mlp_depth, int, lo=1)
        check("c_abstractor", "hidden_size", hidden_size, int, lo=1)
        check("c_abstractor", "pos_emb", pos_emb, bool)
        check("c_abstractor", "pos_grid", pos_grid, int, lo=1)
        self.num_queries, self.pos_grid = num_queries, pos_grid
        side = math.isqrt(num_queries)
        self.pos_emb = nn.Parameter(torch.zeros(1, pos_grid * pos_grid, in_dim)) if pos_emb else None
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)
        block = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        sampler = nn.AdaptiveAvgPool2d((side, side))
        if depth:
            self.net = nn.Sequential(block(depth, in_dim, hidden_size), sampler, block(depth, hidden_size, hidden_size))
            self.readout = silu_mlp(mlp_depth, hidden_size, out_dim)
        else:
            self.net = nn.Sequential(sampler)
            self.readout = silu_mlp(mlp_depth, in_dim, out_dim)
        self.net.apply(honeybee_init)
        self.readout.apply(honeybee_init)

    def position(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == (self.pos_grid, self.pos_grid):
            return self.pos_emb
        return resample_abs_pos_embed(self.pos_emb, list(grid), [self.pos_grid, self.pos_grid], num_prefix_tokens=0)

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        h, w = features.grid
        x = features.patches
        if self.pos_emb is not None:
            x = x + self.position((h, w)).to(x.dtype)
        x = self.net(rearrange(x, "b (h w) d -> b d h w", h=h, w=w))
        return ConnectorOutput.dense(self.readout(rearrange(x, "b d h w -> b (h w) d")))

    def max_tokens(self, info: EncoderInfo) -> int:
        return self.num_queries

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        side = math.isqrt(self.num_queries)  # the adaptive pooling's square grid, whatever the patch grid
        return side, side
