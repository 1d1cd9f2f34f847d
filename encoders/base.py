"""The vision-encoder contract.

An encoder maps a batch of pixel tensors to the features of one *selected layer* (default: the penultimate,
``hidden_states[-2]`` in transformers' indexing, before any post-layernorm, as LLaVA-1.5 and Prismatic do), with the
CLS token kept apart from the N patch tokens and the patch grid (h, w). A connector may ask for more with a
:class:`FeatureRequest` (its ``feature_request``), each computed only when asked:

- ``cls_attention``: the CLS-attention probabilities of the selected layer's block (FasterVLM, VisionZip);
- ``layers``: the patch tokens of further layers (TokenPacker's multi-level keys: ``hidden_states[12, 16, 22, 23]``);
- ``keys``: the attention keys of a block (VisionZip, PruMerge measure similarity on them): the key projection's
  output per head (before any norm or RoPE), of the block that writes the selected layer (``"selected"``) or of the
  block that reads it (``"next"``), with the CLS token's query and key of that block.

Encoders are frozen and run under ``torch.no_grad()`` by default, so their features are a pure function of (encoder,
weights, layer, image, preprocessing, request): ``cache_key()`` and ``FeatureRequest.key()`` name that function.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from torch import nn

from encoders.features import KEYS_OF, EncoderInfo, FeatureRequest, VisionFeatures  # noqa: F401  (the contract's types)


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
            raise ValueError(
                f"{checkpoint!r}: the size must be a multiple of the tiny preset's patch size {patch} "
                f"and at least {2 * patch} pixels"
            )
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

    def forward(self, pixel_values: torch.Tensor, with_cls_attention: bool | FeatureRequest = False) -> VisionFeatures:
        """Features of ``pixel_values``; ``with_cls_attention``: a :class:`FeatureRequest`, or True for the CLS
        attention alone."""
        request = FeatureRequest.of(with_cls_attention)
        # a half-precision tower computes under autocast of its own dtype wherever it is called (feature cache,
        # generation, profiling): its norms and softmaxes then run in fp32, as under the training autocast
        half = getattr(torch, self.dtype_name) if self.dtype_name in ("bfloat16", "float16") else None
        device = pixel_values.device.type
        precision = torch.autocast(device, dtype=half) if half else contextlib.nullcontext()
        with precision, torch.no_grad() if self.frozen else contextlib.nullcontext():
            if request.extra:
                return self._encode_request(pixel_values, request)
            return self._encode(pixel_values, request.cls_attention)

    def encode_images(
        self, images: list[Image.Image], with_cls_attention: bool | FeatureRequest = False
    ) -> VisionFeatures:
        device = next(self.parameters()).device
        return self(self.preprocess(images).to(device), with_cls_attention=with_cls_attention)

    # --------------------------------------------------- further layers and attention keys
    #: tokens before the patches in the tower's sequence (CLS, register tokens): 1 unless the family says otherwise
    prefix_tokens: int = 1

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (block i writes ``hidden_states[i + 1]``). Families that give further
        layers and attention keys implement it, with ``query_key``."""
        raise NotImplementedError(
            f"{self.registered_name or type(self).__name__} gives no further layers or "
            "attention keys; use a connector that needs only the selected layer"
        )

    def query_key(self, block: nn.Module, sink: dict[str, torch.Tensor]) -> list:
        """Hooks on ``block`` that put its attention's query and key projections of the whole sequence, (B, T, H *
        Dh) each (heads concatenated, as the projection writes them), into ``sink["q"]`` and ``sink["k"]``; returns
        the hook handles."""
        raise NotImplementedError(f"{self.registered_name or type(self).__name__} gives no attention keys")

    def layer_block(self, layer: int) -> int:
        """The block (0-based) whose output is ``hidden_states[layer]``; the embeddings (0) are not offered."""
        n = self.info.num_layers
        index = layer if layer >= 0 else n + 1 + layer
        if not 1 <= index <= n:
            raise ValueError(
                f"{self.registered_name}: layer {layer} is out of range for {n} blocks; use 1..{n} or "
                f"-1..-{n} (transformers' hidden_states indexing)"
            )
        return index - 1

    def keyed_block(self, keys: str) -> int:
        """The block whose attention keys ``keys`` ("selected" or "next") names."""
        block = self.layer_block(self.layer) + (keys == "next")
        if block >= self.info.num_layers:
            raise ValueError(
                f"{self.registered_name}: keys of the block after layer {self.layer} were asked for, but "
                f"it is the last of {self.info.num_layers}; pick an earlier layer (--layer)"
            )
        return block

    def block_name(self, kind: str, ask) -> str:
        """The block a further ``"layer"`` or the ``"keys"`` ask names, as the feature cache names it (a fused
        encoder names each part's)."""
        return str(self.layer_block(ask) if kind == "layer" else self.keyed_block(ask))

    def _encode_request(self, pixel_values: torch.Tensor, request: FeatureRequest) -> VisionFeatures:
        """``_encode`` with hooks on the blocks that catch the further layers' outputs and the keyed block's query
        and key projections (one forward; nothing is computed that the tower does not compute anyway)."""
        blocks = self.blocks()
        try:
            wanted = [self.layer_block(i) for i in request.layers]
        except ValueError as err:
            raise ValueError(
                f"{err}; the connector asked for layers {list(request.layers)} (set its key layers to "
                "ones this tower has)"
            ) from None
        caught: dict = {}
        handles = [
            blocks[b].register_forward_hook(lambda m, a, out, b=b: caught.__setitem__(b, first(out)))
            for b in dict.fromkeys(wanted)
        ]
        sink: dict[str, torch.Tensor] = {}
        if request.keys is not None:
            handles += self.query_key(blocks[self.keyed_block(request.keys)], sink)
        try:
            features = self._encode(pixel_values, request.cls_attention)
        finally:
            for h in handles:
                h.remove()
        P = self.prefix_tokens
        extra: dict[str, torch.Tensor | None] = {}
        if wanted:
            extra["layers"] = torch.stack([caught[b][:, P:] for b in wanted], dim=1)
        if request.keys is not None:
            heads = self.key_shape()[0]
            q, k = (sink[n].unflatten(-1, (heads, -1)) for n in ("q", "k"))
            extra["keys"] = k[:, P:]
            extra["cls_qk"] = torch.stack([q[:, 0], k[:, 0]], dim=1) if features.cls is not None else None
        return replace(features, **extra)

    def request_layout(self, request: FeatureRequest) -> dict[str, tuple[int, ...]]:
        """Per-image shapes of what ``request`` adds (the feature cache's rows)."""
        info, out = self.info, {}
        if request.cls_attention:
            out["cls_attention"] = (info.num_heads, info.num_patches)
        if request.layers:
            out["layers"] = (len(request.layers), info.num_patches, info.hidden_size)
        if request.keys is not None:
            out["keys"] = (info.num_patches, *self.key_shape())
            if info.has_cls:
                out["cls_qk"] = (2, *self.key_shape())
        return out

    def key_shape(self) -> tuple[int, int]:
        """(H, Dh) of the attention keys: the tower's heads and width / heads for every built-in family."""
        return self.info.num_heads, self.info.hidden_size // self.info.num_heads

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


def first(output):
    """A block's output tensor (transformers blocks may return a tuple whose first element it is)."""
    return output[0] if isinstance(output, tuple) else output
