"""What encoders hand to connectors: :class:`VisionFeatures` (the selected layer's patches and CLS token, and what a
:class:`FeatureRequest` added: CLS attention, further layers, attention keys) and :class:`EncoderInfo` (a built
encoder's typed properties). The contract that produces them is in ``encoders/base.py``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from encoders.base import VisionEncoder

KEYS_OF = ("selected", "next")


@dataclass(frozen=True)
class FeatureRequest:
    """What a connector asks of the encoder besides the selected layer's patches and CLS token.

    cls_attention: the selected block's CLS-attention probabilities (``VisionFeatures.cls_attention``).
    layers:        more layers (transformers' ``hidden_states`` indexing, negative counts from the end) whose patch
                   tokens come as ``VisionFeatures.layers`` (B, len(layers), N, Dv), in this order.
    keys:          None, ``"selected"`` (the block whose output is the selected layer) or ``"next"`` (the block that
                   reads it): that block's attention keys of the patches per head (``VisionFeatures.keys``
                   (B, N, H, Dh)) and its CLS query and key (``VisionFeatures.cls_qk`` (B, 2, H, Dh), None without a
                   CLS token).
    """

    cls_attention: bool = False
    layers: tuple[int, ...] = ()
    keys: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"FeatureRequest.layers must be integers (hidden_states indices), got {self.layers!r}")
        if self.keys not in (None, *KEYS_OF):
            raise ValueError(f"FeatureRequest.keys must be None or one of {', '.join(KEYS_OF)}, got {self.keys!r}")

    @staticmethod
    def of(value: bool | FeatureRequest | None) -> FeatureRequest:
        """A request from a request, or from the older ``with_cls_attention`` flag."""
        return value if isinstance(value, FeatureRequest) else FeatureRequest(cls_attention=bool(value))

    @property
    def extra(self) -> bool:
        """Whether it asks for more than the CLS attention (which every family gives through ``_encode``)."""
        return bool(self.layers) or self.keys is not None

    def key(self, encoder: VisionEncoder) -> str:
        """The feature cache's name for this request on ``encoder``: the layers and the keyed block resolved to
        block numbers, so ``-2`` and ``23`` of a 24-block tower share one cache and two different asks never do.
        ``+attn`` alone for the CLS attention (the name caches had before layers and keys existed)."""
        parts = ["attn"] if self.cls_attention else []
        if self.layers:
            parts.append("layers=" + ",".join(encoder.block_name("layer", i) for i in self.layers))
        if self.keys is not None:
            parts.append(f"keys={encoder.block_name('keys', self.keys)}")
        return "".join("+" + p for p in parts)


@dataclass
class VisionFeatures:
    """What every encoder returns and every connector consumes.

    patches:       (B, N, Dv) patch tokens of the selected layer, raster order over ``grid``.
    cls:           (B, Dv) the CLS token of that layer, or None for encoders without one (SigLIP).
    grid:          (h, w) with h * w == N.
    cls_attention: (B, H, N) attention probabilities of the CLS query over the patch keys in the selected layer
                   (for SigLIP: the attention-pooling probe over the final patches), or None if not requested.
    layers:        (B, L, N, Dv) the patch tokens of the requested further layers, or None.
    keys:          (B, N, H, Dh) the requested block's attention keys of the patches, per head, or None.
    cls_qk:        (B, 2, H, Dh) that block's query and key of the CLS token, or None.
    """

    patches: torch.Tensor
    cls: torch.Tensor | None
    grid: tuple[int, int]
    cls_attention: torch.Tensor | None = None
    layers: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    cls_qk: torch.Tensor | None = None

    #: the per-image tensors (every field but the grid), in order
    TENSORS = ("patches", "cls", "cls_attention", "layers", "keys", "cls_qk")

    def __post_init__(self) -> None:
        h, w = self.grid
        if self.patches.dim() != 3 or self.patches.shape[1] != h * w:
            raise ValueError(f"patches must be (B, h*w={h * w}, Dv); got {tuple(self.patches.shape)}")

    @property
    def batch_size(self) -> int:
        return self.patches.shape[0]

    def _map(self, fn) -> VisionFeatures:
        return replace(
            self, **{name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in self.TENSORS}
        )

    def to(self, *args, **kwargs) -> VisionFeatures:
        return self._map(lambda t: t.to(*args, **kwargs))

    def select(self, index) -> VisionFeatures:
        return self._map(lambda t: t[index])

    @staticmethod
    def stack(items: list[VisionFeatures]) -> VisionFeatures:
        """Batch single-image features (e.g. from the feature cache)."""
        first = items[0]
        fields = {
            name: None if getattr(first, name) is None else torch.cat([getattr(i, name) for i in items])
            for name in VisionFeatures.TENSORS
        }
        return VisionFeatures(grid=first.grid, **fields)


@dataclass
class EncoderInfo:
    """Typed properties of a built encoder (what connectors and the harness may rely on)."""

    hidden_size: int
    grid: tuple[int, int]
    image_size: int
    has_cls: bool
    num_heads: int
    num_layers: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]
