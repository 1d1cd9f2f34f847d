"""AnyRes (LLaVA-NeXT) tiling geometry: which grid of tiles an image gets, and how many visual tokens that costs.

LLaVA-NeXT (Liu et al., 2024; ``LlavaNextImageProcessor`` / ``LlavaNextForConditionalGeneration`` in transformers)
picks, for an image of ``(height, width)``, the resolution from a list of *grid pinpoints* that keeps the most of the
image's pixels and wastes the fewest (``select_best_resolution``), resizes the image into it keeping the aspect ratio
and pads the rest, cuts it into tiles of the encoder's input size, and adds a global view (the whole image resized
to one tile). Each view is encoded to the encoder's patch grid; the tiles' features are laid out as one large grid,
the rows and columns that fell on padding are removed (``unpad_image``), and a learned ``image_newline`` token ends
each remaining row. So an image costs ``base + unpadded rows x (unpadded columns + 1)`` tokens with a per-patch
projector.

This module is the pixel side: the arithmetic (the counts ``bench tokens --tiling anyres`` prints) and the views
of an image (:class:`AnyResGeometry`), computed as ``LlavaNextImageProcessor`` computes them. What happens to the
views' features (the connector per view, the unpadding, the newline tokens) is the composed model's
(``connector_zoo/model/tiling.py``). ``tests/test_anyres.py`` pins both to transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image
from transformers.image_processing_utils import select_best_resolution

#: LLaVA-NeXT's grid pinpoints (height, width) for a 336-pixel encoder (``llava-v1.6`` configs, transformers' default)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _height_width(text: str) -> tuple[int, int] | None:
    """``"336x672"`` (spaces and case aside) as ``(336, 672)``; None if it is not two positive integers."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def parse_pinpoints(text: str) -> tuple[tuple[int, int], ...]:
    """``"336x672,672x336"`` (height x width, as transformers' ``image_grid_pinpoints``) as pairs; a clear error
    naming the bad item otherwise."""
    out = []
    for item in text.split(","):
        pair = _height_width(item)
        if pair is None:
            raise ValueError(
                f"grid pinpoint {item.strip()!r}: expected HEIGHTxWIDTH in pixels, e.g. 336x672 "
                "(LLaVA-NeXT's: 336x672,672x336,672x672,1008x336,336x1008)"
            )
        out.append(pair)
    return tuple(out)


def scaled_pinpoints(pinpoints, tile: int, reference: int = 336) -> tuple[tuple[int, int], ...]:
    """Pinpoints written for a ``reference``-pixel encoder, as multiples of this encoder's ``tile`` (a 384-pixel
    SigLIP gets 384x768, ... for LLaVA-NeXT's 336x672, ...)."""
    return tuple((h * tile // reference, w * tile // reference) for h, w in pinpoints)


def tile_grid(height: int, width: int, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, columns) of ``tile``-pixel tiles that an image of this size is cut into."""
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    if best_h % tile or best_w % tile:
        raise ValueError(f"grid pinpoint {best_h}x{best_w} is not a multiple of the encoder's {tile}-pixel input")
    return best_h // tile, best_w // tile


def unpadded_grid(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """The feature grid (rows, columns) left after removing the rows or columns that cover the padding of an image
    of ``(height, width)`` fitted into a ``grid_h x grid_w`` feature grid (transformers' ``unpad_image``)."""
    if width / height > grid_w / grid_h:  # wider than the grid: padding above and below
        new_h = int(round(height * (grid_w / width), 7))
        return grid_h - 2 * ((grid_h - new_h) // 2), grid_w
    new_w = int(round(width * (grid_h / height), 7))
    return grid_h, grid_w - 2 * ((grid_w - new_w) // 2)


def anyres_tokens(height: int, width: int, pinpoints, tile: int, side: int) -> dict[str, int]:
    """Visual tokens of one image under AnyRes with a per-patch projector on a ``side x side`` patch grid per view:
    ``tiles`` (without the global view), ``views`` (with it), ``base`` (the global view's patches), ``grid`` (the
    unpadded tile features), ``newlines`` (one per unpadded row) and ``total``."""
    rows, cols = tile_grid(height, width, pinpoints, tile)
    gh, gw = unpadded_grid(height, width, rows * side, cols * side)
    base = side * side
    return {
        "tiles": rows * cols,
        "views": rows * cols + 1,
        "base": base,
        "grid": gh * gw,
        "newlines": gh,
        "total": base + gh * gw + gh,
    }


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"672x448,336x336"`` (height x width each) as pairs; a clear error naming the bad item otherwise."""
    out = []
    for item in text.split(","):
        pair = _height_width(item)
        if pair is None:
            raise ValueError(f"image size {item.strip()!r}: expected HEIGHTxWIDTH in pixels, e.g. 672x672")
        out.append(pair)
    return out


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size an image of ``(height, width)`` is resized to inside ``target`` keeping its aspect ratio (one side
    fills the target, the other is rounded up), as transformers' ``get_patch_output_size``."""
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class AnyResGeometry:
    """AnyRes for an encoder of ``tile`` pixels: ``pinpoints`` (height, width), each a multiple of ``tile``.

    An image becomes ``1 + rows x cols`` views of ``tile x tile`` pixels: first the global view (the whole image
    resized to the tile, aspect ratio not kept), then the tiles in raster order of the best pinpoint, to which the
    image is resized keeping its aspect ratio (bicubic) and centred on black padding."""

    pinpoints: tuple[tuple[int, int], ...]
    tile: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "pinpoints", tuple((int(h), int(w)) for h, w in self.pinpoints))
        if not self.pinpoints:
            raise ValueError("AnyRes needs at least one grid pinpoint")
        off = [f"{h}x{w}" for h, w in self.pinpoints if h % self.tile or w % self.tile]
        if off:
            raise ValueError(
                f"grid pinpoints {', '.join(off)} are not multiples of the encoder's {self.tile}-pixel input; "
                f"use multiples of {self.tile} (--grid-pinpoints)"
            )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of this size."""
        return tile_grid(height, width, self.pinpoints, self.tile)

    def num_views(self, height: int, width: int) -> int:
        rows, cols = self.grid(height, width)
        return 1 + rows * cols

    @property
    def max_views(self) -> int:
        return 1 + max(h * w for h, w in self.pinpoints) // (self.tile * self.tile)

    def views(self, image: Image.Image) -> list[Image.Image]:
        """The global view, then the tiles in raster order; RGB, ``tile x tile`` each."""
        image = image.convert("RGB")
        width, height = image.size
        best = select_best_resolution((height, width), [list(p) for p in self.pinpoints])
        new_h, new_w = fitted_size(height, width, best)
        canvas = Image.new("RGB", (best[1], best[0]))
        canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((best[1] - new_w) // 2, (best[0] - new_h) // 2))
        t = self.tile
        tiles = [canvas.crop((x, y, x + t, y + t)) for y in range(0, best[0], t) for x in range(0, best[1], t)]
        return [image.resize((t, t), Image.BICUBIC), *tiles]

    def tag(self, view: int) -> str:
        """What, besides the image, determines a view's pixels (the feature cache keys a view's row by both)."""
        points = ",".join(f"{h}x{w}" for h, w in self.pinpoints)
        return f"|anyres:{points}@{self.tile}#{view}"

    @property
    def spec(self) -> dict:
        return {"name": "anyres", "grid_pinpoints": [list(p) for p in self.pinpoints]}
