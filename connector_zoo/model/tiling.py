"""AnyRes tiling in the composed model (LLaVA-NeXT): the views' visual tokens laid out as one image per sample.

An image comes as ``1 + rows x cols`` views (``encoders/anyres.py``: the global view, then the tiles in raster order).
Each view is encoded and connected on its own, at the encoder's input size, so every connector runs exactly as it
was built for one image (its position tables, its pooling windows, its queries). Then, per image:

- a connector whose tokens form a grid (``Connector.output_grid``: linear and MLP projectors on the patches,
  c_abstractor, ldpv2, pixel_shuffle, tokenpacker, avgpool) gets LLaVA-NeXT's ``spatial_unpad`` layout: the global
  view's tokens, then the tiles' token grids put side by side as one large grid, the rows or columns that fell on
  the padding removed (the image's aspect ratio), and a learned ``image_newline`` token after each row
  (``LlavaNextModel.pack_image_features``, at the connector's output grid instead of the patch grid);
- a connector whose tokens form no grid (Q-Former and resampler queries, pruned selections) gets the views' tokens
  one after the other, global view first: without a grid there are no rows to end or padding to find.

The connector runs per view rather than on the merged tile grid because a tile is what the encoder saw: a spatial
connector's windows (c_abstractor's convolutions, pixel_shuffle's 2x2 blocks) then never straddle two tiles whose
features were computed apart, and its tokens per view stay what they are without tiling.

``max_tiles`` (LLaVA-OneVision's ``anyres_max_N``): when the unpadded tile grid holds more than about N views'
worth of tokens (by more than 10 % in side), it is resized bilinearly to N views' worth, keeping its aspect ratio,
before the newlines are added (``LlavaOnevisionModel.pack_image_features``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from connectors.base import Connector, ConnectorOutput
from encoders.anyres import DEFAULT_PINPOINTS, AnyResGeometry, scaled_pinpoints, unpadded_grid
from encoders.base import EncoderInfo


class AnyRes(nn.Module):
    """The merge of a tiled image's views; holds ``image_newline`` (the LLM's width) when ``grid`` is True."""

    def __init__(self, geometry: AnyResGeometry, hidden_size: int, grid: bool, max_tiles: int | None = None):
        super().__init__()
        if max_tiles is not None and (not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1):
            raise ValueError(
                f"anyres max_tiles must be a positive integer (OneVision's anyres_max_9: 9), not {max_tiles!r}"
            )
        self.geometry, self.max_tiles = geometry, max_tiles
        # LLaVA-NeXT's initialisation: N(0, 1 / hidden_size)
        self.image_newline = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size)) if grid else None

    @property
    def spec(self) -> dict:
        return self.geometry.spec | ({"max_tiles": self.max_tiles} if self.max_tiles is not None else {})

    def views_per_image(self, image_sizes: list[tuple[int, int]]) -> list[int]:
        return [self.geometry.num_views(h, w) for h, w in image_sizes]

    def forward(
        self, views: ConnectorOutput, image_sizes: list[tuple[int, int]], grid: tuple[int, int] | None
    ) -> ConnectorOutput:
        """``views``: the connector's output for every view of every image, in order (V, T, D); ``image_sizes``:
        (height, width) of each image; ``grid``: the connector's output grid for one view, or None. -> one row of
        tokens per image."""
        counts = self.views_per_image([tuple(s) for s in image_sizes])
        if sum(counts) != views.tokens.shape[0]:
            raise ValueError(
                f"AnyRes: {views.tokens.shape[0]} views were encoded, but images of sizes {list(image_sizes)} have "
                f"{sum(counts)} ({counts}); give each image's original (height, width)"
            )
        per_image, start = [], 0
        for (height, width), n in zip(image_sizes, counts):
            tokens, mask = views.tokens[start : start + n], views.mask[start : start + n]
            start += n
            if grid is None or self.image_newline is None:
                per_image.append(tokens[mask])
                continue
            if not bool(mask.all()):
                raise ValueError("AnyRes: a connector with an output grid emitted a partial mask")
            per_image.append(self.spatial_unpad(tokens, (height, width), grid))
        longest = max(t.shape[0] for t in per_image)
        out = views.tokens.new_zeros(len(per_image), longest, views.tokens.shape[-1])
        keep = torch.zeros(len(per_image), longest, dtype=torch.bool, device=out.device)
        for b, t in enumerate(per_image):
            out[b, : t.shape[0]] = t
            keep[b, : t.shape[0]] = True
        return ConnectorOutput(out, keep, views.aux_loss)

    def spatial_unpad(self, tokens: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """(views, gh * gw, D) of one image -> (tokens, D): the global view's, then the unpadded tile grid row by
        row, each row ended by ``image_newline``."""
        (gh, gw), D = grid, tokens.shape[-1]
        rows, cols = self.geometry.grid(*size)
        tiles = tokens[1:].reshape(rows, cols, gh, gw, D).permute(0, 2, 1, 3, 4).reshape(rows * gh, cols * gw, D)
        keep_h, keep_w = unpadded_grid(size[0], size[1], rows * gh, cols * gw)
        top, left = (rows * gh - keep_h) // 2, (cols * gw - keep_w) // 2
        tiles = tiles[top : top + keep_h, left : left + keep_w]
        if self.max_tiles is not None:
            ratio = math.sqrt(keep_h * keep_w / (self.max_tiles * gh * gw))
            if ratio > 1.1:  # OneVision's anyres_max_N: bilinear, to N views' worth of tokens
                size = [int(keep_h // ratio), int(keep_w // ratio)]
                tiles = F.interpolate(tiles.permute(2, 0, 1)[None], size, mode="bilinear")[0].permute(1, 2, 0)
                keep_h, keep_w = size
        newline = self.image_newline.to(tokens.dtype).expand(keep_h, 1, D)
        return torch.cat([tokens[0], torch.cat([tiles, newline], dim=1).reshape(-1, D)])

    def max_tokens(self, connector: Connector, info: EncoderInfo) -> int:
        """The most visual tokens one image can get (the largest pinpoint; unpadding only removes)."""
        grid = connector.output_grid(*info.grid) if self.image_newline is not None else None
        tile = self.geometry.tile
        most = 0
        for h, w in self.geometry.pinpoints:
            rows, cols = h // tile, w // tile
            if grid is None:
                most = max(most, (1 + rows * cols) * connector.max_tokens(info))
            else:
                gh, gw = grid
                most = max(most, gh * gw + rows * gh * (cols * gw + 1))
        return most


def build_tiling(spec: dict | None, info: EncoderInfo, connector: Connector, hidden_size: int) -> AnyRes | None:
    """The tiling a spec names (``{"name": "anyres", "grid_pinpoints": [[h, w], ...]}``, pinpoints in pixels of
    this encoder's input; without ``grid_pinpoints``, LLaVA-NeXT's scaled to the encoder's input), or None for
    none."""
    if not spec:
        return None
    spec = dict(spec)
    name = spec.pop("name", None)
    if name != "anyres":
        raise ValueError(f"tiling {name!r} is not known; the one built is 'anyres' (LLaVA-NeXT)")
    pinpoints = spec.pop("grid_pinpoints", None) or scaled_pinpoints(DEFAULT_PINPOINTS, info.image_size)
    max_tiles = spec.pop("max_tiles", None)
    if spec:
        raise ValueError(
            f"anyres tiling takes grid_pinpoints (a list of [height, width]) and max_tiles, not {sorted(spec)}"
        )
    geometry = AnyResGeometry(tuple(tuple(p) for p in pinpoints), info.image_size)
    return AnyRes(geometry, hidden_size, grid=connector.output_grid(*info.grid) is not None, max_tiles=max_tiles)
