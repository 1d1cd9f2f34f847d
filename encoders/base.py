"""The vision-encoder contract.

An encoder maps a batch of pixel tensors to the features of one *selected layer* (default: the penultimate,
``hidden_states[-2]`` in transformers' indexing, before any post-layernorm, as LLaVA-1.5 and Prismatic do), with the
CLS token kept apart from the N patch tokens, the patch grid (h, w), and on request the CLS-attention scores of that
same layer (FasterVLM). Encoders are frozen and run under ``torch.no_grad()`` by default, so their features are a pure
function of (encoder, weights, layer, image, preprocessing): ``cache_key()`` names that function.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from torch import nn


@dataclass
class VisionFeatures:
    """What every encoder returns and every connector consumes.

    patches:       (B, N, Dv) patch tokens of the selected layer, raster order over ``grid``.
    cls:           (B, Dv) the CLS token of that layer, or None for encoders without one (SigLIP).
    grid:          (h, w) with h * w == N.
    cls_attention: (B, H, N) attention probabilities of the CLS query over the patch keys in the selected layer
                   (for SigLIP: the attention-pooling probe over the final patches), or None if not requested.
    """

    patches: torch.Tensor
    cls: torch.Tensor | None
    grid: tuple[int, int]
    cls_attention: torch.Tensor | None = None

    def __post_init__(self) -> None:
        h, w = self.grid
        if self.patches.dim() != 3 or self.patches.shape[1] != h * w:
            raise ValueError(f"patches must be (B, h*w={h * w}, Dv); got {tuple(self.patches.shape)}")

    @property
    def batch_size(self) -> int:
        return self.patches.shape[0]

    def to(self, *args, **kwargs) -> VisionFeatures:
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return replace(self, patches=move(self.patches), cls=move(self.cls), cls_attention=move(self.cls_attention))

    def select(self, index) -> VisionFeatures:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(self, patches=self.patches[index], cls=pick(self.cls), cls_attention=pick(self.cls_attention))

    @staticmethod
    def stack(items: list[VisionFeatures]) -> VisionFeatures:
        """Batch single-image features (e.g. from the feature cache)."""
        first = items[0]
        cat = lambda attr: None if getattr(first, attr) is None else torch.cat([getattr(i, attr) for i in items])  # noqa: E731
        return VisionFeatures(cat("patches"), cat("cls"), first.grid, cat("cls_attention"))


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


class VisionEncoder(nn.Module):
    """Base class of every encoder. Subclasses implement ``_encode`` and ``preprocess`` and set ``info``."""

    registered_name: str = ""
    #: preset name -> kwargs of the tiny random-initialised configurations (built, saved, loaded back by path)
    presets: dict[str, dict[str, Any]] = {}
    default_checkpoint: str = "tiny"
    #: the preset keys of the input side and the patch side (``tiny@R``: the tiny preset at R pixels)
    size_keys: tuple[str, str] = ("image_size", "patch_size")

    @classmethod
    def preset_params(cls, checkpoint: str) -> tuple[str, dict[str, Any] | None]:
        """(preset name, preset kwargs) for a preset name or ``tiny@R`` (the tiny preset at R x R pixels, its patch
        size kept, so the grid grows: ``tiny@128`` has 16x16 patches); ``(checkpoint, None)`` for anything else."""
        if checkpoint in cls.presets:
            return checkpoint, cls.presets[checkpoint]
        match = re.fullmatch(r"tiny@(\d+)", checkpoint)
        if not match or "tiny" not in cls.presets:
            return checkpoint, None
        size_key, patch_key = cls.size_keys
        size, patch = int(match[1]), cls.presets["tiny"][patch_key]
        if size % patch or size < 2 * patch:
            raise ValueError(f"{checkpoint!r}: the size must be a multiple of the tiny preset's patch size {patch} "
                             f"and at least {2 * patch} pixels")  # fmt: skip
        return f"tiny{size}", {**cls.presets["tiny"], size_key: size}

    def __init__(self, checkpoint: str, layer: int = -2, frozen: bool = True, dtype: str | None = None):
        """``dtype``: the weights' storage dtype (``float32`` unless given, e.g. ``bfloat16`` for a frozen tower)."""
        super().__init__()
        self.checkpoint = checkpoint
        self.layer = layer
        self.frozen = frozen
        self.dtype_name = dtype or "float32"
        self.info: EncoderInfo

    # ---------------------------------------------------------------- contract
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) pixel tensor with the checkpoint's own preprocessing."""
        raise NotImplementedError

    def _encode(self, pixel_values: torch.Tensor, with_cls_attention: bool) -> VisionFeatures:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, with_cls_attention: bool = False) -> VisionFeatures:
        # a half-precision tower computes under autocast of its own dtype wherever it is called (feature cache,
        # generation, profiling): its norms and softmaxes then run in fp32, as under the training autocast
        half = getattr(torch, self.dtype_name) if self.dtype_name in ("bfloat16", "float16") else None
        device = pixel_values.device.type
        with torch.autocast(device, dtype=half) if half else contextlib.nullcontext():
            if self.frozen:
                with torch.no_grad():
                    return self._encode(pixel_values, with_cls_attention)
            return self._encode(pixel_values, with_cls_attention)

    def encode_images(self, images: list[Image.Image], with_cls_attention: bool = False) -> VisionFeatures:
        device = next(self.parameters()).device
        return self(self.preprocess(images).to(device), with_cls_attention=with_cls_attention)

    # ----------------------------------------------------------------- helpers
    def freeze(self, frozen: bool = True) -> VisionEncoder:
        self.frozen = frozen
        self.requires_grad_(not frozen)
        if frozen:
            self.eval()
        return self

    def train(self, mode: bool = True) -> VisionEncoder:
        # a frozen encoder stays in eval mode (no dropout), whatever the composed model does
        return super().train(mode and not self.frozen)

    def block_index(self, num_layers: int) -> int:
        """The transformer block whose output is ``hidden_states[self.layer]`` (hidden_states[0] = embeddings)."""
        index = self.layer if self.layer >= 0 else num_layers + 1 + self.layer
        if not 1 <= index <= num_layers:
            raise ValueError(
                f"{self.registered_name}: layer {self.layer} is out of range for {num_layers} blocks; "
                f"use 1..{num_layers} or -1..-{num_layers} (transformers' hidden_states indexing)"
            )
        return index - 1

    def weights_hash(self) -> str:
        """SHA-256 of every weight's name, dtype, shape and every byte, streamed from the tensors' own memory (no
        float copy). Remembered until a tensor is replaced or changed in place (its storage or version counter moves:
        an optimizer step, ``load_state_dict``), so repeated calls cost nothing and never answer for old weights."""
        state = sorted(self.state_dict().items())
        stamp = tuple((name, t.data_ptr(), t._version) for name, t in state)
        memo = getattr(self, "_weights_memo", None)
        if memo is None or memo[0] != stamp:
            weights = hashlib.sha256()
            for name, tensor in state:
                weights.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                weights.update(memoryview(flat.view(torch.uint8).numpy()))
            self._weights_memo = memo = (stamp, weights.hexdigest())
        return memo[1]

    def cache_key(self) -> str:
        """Everything that determines the features: the class (a plugin subclass may compute them differently from
        the family it extends), family, weights (all of their bytes), layer, preprocessing."""
        desc = {
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "family": self.registered_name,
            "checkpoint": str(self.checkpoint),
            "layer": self.layer,
            "dtype": self.dtype_name,
            "preprocess": self.preprocess_signature(),
            "weights": self.weights_hash(),
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]

    def preprocess_signature(self) -> dict[str, Any]:
        return {}

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, Dv) the model's own pooled image embedding (CLS after norm, or SigLIP's probe), with gradients:
        what contrastive pretraining in the mini world trains."""
        raise NotImplementedError

    def pooled_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, VisionFeatures]:
        """``(self.pooled(px), self(px))`` with gradients, for pretraining that scores both (the mini world's
        contrastive + dense objective). This default runs the tower twice; a family whose one forward gives both
        overrides it (the transformers towers do)."""
        return self.pooled(pixel_values), self(pixel_values)

    def save_checkpoint(self, directory) -> None:
        """Write weights + preprocessing so that ``from_checkpoint(directory)`` rebuilds this encoder."""
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None = None, **kwargs: Any) -> VisionEncoder:
        raise NotImplementedError
