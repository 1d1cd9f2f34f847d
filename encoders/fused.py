"""``fused``: two (or more) encoders side by side, their patch features concatenated channel-wise on a common grid
(Prismatic's ``dinosiglip``: DINOv2 + SigLIP, Karamcheti et al. 2024, arXiv 2402.07865).

The checkpoint names the parts: ``"dinov2:tiny+siglip:tiny"`` (the default), or for Prismatic's 384-px model
``"dinov2:facebook/dinov2-with-registers-large@384+siglip:google/siglip-so400m-patch14-384"`` (27x27 both). Each part
keeps its own preprocessing: ``preprocess`` stacks the parts' pixel tensors along the channel axis (B, 3 x parts, S,
S) and each part reads its own three channels, as Prismatic's processor hands each backbone its own tensor. The parts
must agree on the image side S.

    patches = concat over parts of the part's patches (the selected ``layer`` of each), on the first part's grid;
              a part with another grid is resampled to it bilinearly
    cls     = the parts' CLS tokens concatenated when every part has one, else None (SigLIP has none)
    cls_attention = the first part's that gives one (DINOv2's CLS row; SigLIP's pooling probe otherwise)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from encoders import build_encoder, register
from encoders.base import EncoderInfo, FeatureRequest, VisionEncoder, VisionFeatures


def parse_parts(checkpoint: str) -> list[tuple[str, str]]:
    parts = []
    for piece in checkpoint.split("+"):
        name, sep, ckpt = piece.partition(":")
        if not sep or not name or not ckpt:
            raise ValueError(
                f"fused encoder checkpoint {checkpoint!r}: each part must be name:checkpoint, joined by "
                f"'+' (e.g. dinov2:tiny+siglip:tiny); got {piece!r}"
            )
        parts.append((name, ckpt))
    if len(parts) < 2:
        raise ValueError(f"fused encoder checkpoint {checkpoint!r} names {len(parts)} part; it needs at least 2")
    return parts


@register("fused")
class FusedEncoder(VisionEncoder):
    """Encoders side by side (Prismatic DINOv2 + SigLIP): patch features concatenated channel-wise."""

    default_checkpoint = "dinov2:tiny+siglip:tiny"

    def __init__(self, checkpoint: str, layer: int = -2, frozen: bool = True, dtype: str | None = None):
        super().__init__(checkpoint, layer, frozen, dtype)
        self.parts = nn.ModuleList(
            build_encoder(name, ckpt, layer=layer, frozen=frozen, dtype=dtype) for name, ckpt in parse_parts(checkpoint)
        )
        sizes = [p.info.image_size for p in self.parts]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"fused encoder {checkpoint!r}: the parts take images of {sizes} pixels; they must agree "
                f"(run DINOv2 at the other's size with '@R', e.g. dinov2:<checkpoint>@384)"
            )
        first = self.parts[0].info
        self.info = EncoderInfo(
            hidden_size=sum(p.info.hidden_size for p in self.parts),
            grid=first.grid,
            image_size=first.image_size,
            has_cls=all(p.info.has_cls for p in self.parts),
            num_heads=first.num_heads,
            num_layers=first.num_layers,
        )
        self.freeze(frozen)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None = None, **kwargs: Any) -> FusedEncoder:
        return cls(checkpoint or cls.default_checkpoint, **kwargs)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.cat([p.preprocess(images) for p in self.parts], dim=1)

    def preprocess_signature(self) -> dict[str, Any]:
        return {f"{i}:{p.registered_name}": p.preprocess_signature() for i, p in enumerate(self.parts)}

    def on_grid(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.info.grid):
            return patches
        x = rearrange(patches, "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        return rearrange(
            F.interpolate(x.float(), size=self.info.grid, mode="bilinear").to(x.dtype), "b d h w -> b (h w) d"
        )

    def _encode(self, pixel_values: torch.Tensor, with_cls_attention: bool) -> VisionFeatures:
        return self._combine([p(px, with_cls_attention) for p, px in zip(self.parts, pixel_values.split(3, dim=1))])

    def _encode_request(self, pixel_values: torch.Tensor, request: FeatureRequest) -> VisionFeatures:
        keyed = self.keyed_part() if request.keys is not None else None
        outs = []
        for part, px in zip(self.parts, pixel_values.split(3, dim=1)):  # keys: asked of the keyed part alone
            ask = request if part is keyed else dataclasses.replace(request, keys=None)
            outs.append(part(px, ask))
        return self._combine(outs)

    def _combine(self, outs: list[VisionFeatures]) -> VisionFeatures:
        patches = torch.cat([self.on_grid(o.patches, o.grid) for o in outs], dim=-1)
        cls = torch.cat([o.cls for o in outs], dim=-1) if all(o.cls is not None for o in outs) else None
        attention = next(
            (o.cls_attention for o in outs if o.cls_attention is not None and o.grid == self.info.grid), None
        )
        layers = None
        if outs[0].layers is not None:  # each further layer concatenated channel-wise, as the selected one
            per = [o.layers for o in outs]
            layers = torch.stack(
                [
                    torch.cat([self.on_grid(t[:, i], o.grid) for t, o in zip(per, outs)], dim=-1)
                    for i in range(per[0].shape[1])
                ],
                dim=1,
            )
        keyed = next((o for o in outs if o.keys is not None), None)
        return VisionFeatures(
            patches=patches,
            cls=cls,
            grid=self.info.grid,
            cls_attention=attention,
            layers=layers,
            keys=None if keyed is None else keyed.keys,
            cls_qk=None if keyed is None else keyed.cls_qk,
        )

    # the further layers come from every part (by each part's own depth); the attention keys from one part, the
    # first on the common grid (the CLS attention's policy), since keys of different towers do not share a space
    def keyed_part(self) -> VisionEncoder:
        part = next((p for p in self.parts if tuple(p.info.grid) == tuple(self.info.grid)), None)
        if part is None:
            raise ValueError(f"fused encoder {self.checkpoint!r}: no part is on the common grid to give keys")
        return part

    def key_shape(self) -> tuple[int, int]:
        return self.keyed_part().key_shape()

    def block_name(self, kind: str, ask) -> str:
        if kind == "keys":
            part = self.keyed_part()
            return f"{self.parts.index(part)}:{part.keyed_block(ask)}"
        return "/".join(str(part.layer_block(ask)) for part in self.parts)

    def layer_block(self, layer: int) -> int:
        for part in self.parts:  # every part must have the layer
            part.layer_block(layer)
        return self.parts[0].layer_block(layer)

    def keyed_block(self, keys: str) -> int:
        return self.keyed_part().keyed_block(keys)

    def request_layout(self, request: FeatureRequest) -> dict[str, tuple[int, ...]]:
        out = super().request_layout(dataclasses.replace(request, keys=None))
        if request.keys is not None:
            part = self.keyed_part()
            out["keys"] = (self.info.num_patches, *part.key_shape())
            if part.info.has_cls:
                out["cls_qk"] = (2, *part.key_shape())
        return out

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.pooled(px) for p, px in zip(self.parts, pixel_values.split(3, dim=1))], dim=-1)

    def pooled_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, VisionFeatures]:
        # each part's own one-forward pooled_features, combined as _encode combines their features
        pairs = [p.pooled_features(px) for p, px in zip(self.parts, pixel_values.split(3, dim=1))]
        return torch.cat([pooled for pooled, _ in pairs], dim=-1), self._combine([f for _, f in pairs])

    def save_checkpoint(self, directory) -> None:
        raise NotImplementedError("a fused encoder is saved as its parts; save each part's checkpoint")
