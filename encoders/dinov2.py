"""DINOv2 through transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (Oquab et al. 2023; Darcet et al.
2024 for the registers; Prismatic's ``dinov2-vit-l`` and the DINOv2 half of its ``dinosiglip``).

The token sequence is [CLS, R register tokens, N patches] (R = ``num_register_tokens``, 0 without registers).
Features are ``hidden_states[layer]`` (default -2, the penultimate block's output before the final LayerNorm, as
Prismatic takes it): the CLS token apart, the registers dropped, the N patches kept. The CLS-attention row of that
block is ``attentions[block][:, :, 0, 1 + R:]`` (eager attention). The checkpoint's model type decides the class
(``AutoModel``), so plain and register checkpoints both load.

The grid follows the processor's crop (224 / 14 = 16x16 for the hub checkpoints). DINOv2 interpolates its position
embeddings to any input, so ``<checkpoint>@R`` runs it at R x R pixels (``facebook/dinov2-large@384``: 27x27 patches,
Prismatic's 384-px setting); the tiny preset takes ``tiny@R`` the same way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from transformers import AutoModel, BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from encoders import register
from encoders._hf import HFVisionEncoder
from encoders.base import VisionFeatures

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TINY_DINO = dict(
    hidden_size=64,
    mlp_ratio=2,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    num_register_tokens=4,
)


@register("dinov2")
class DINOv2Encoder(HFVisionEncoder):
    """DINOv2 ViT (transformers): penultimate layer, CLS apart, register tokens dropped, CLS attention for pruning."""

    model_cls = AutoModel
    config_cls = Dinov2WithRegistersConfig
    processor_cls = BitImageProcessor
    default_checkpoint = "tiny"
    presets = {"tiny": TINY_DINO, "tiny-24": {**TINY_DINO, "image_size": 96, "patch_size": 4}}
    real_checkpoints = ("facebook/dinov2-with-registers-large", "facebook/dinov2-large")
    geometries = {
        name: dict(
            hidden_size=1024,
            mlp_ratio=4,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=518,
            patch_size=14,
            layerscale_value=1e-5,
            num_register_tokens=regs,
        )
        for name, regs in (("facebook/dinov2-with-registers-large", 4), ("facebook/dinov2-large", 0))
    }

    def __init__(self, checkpoint: str, layer: int = -2, frozen: bool = True, dtype: str | None = None):
        match = re.fullmatch(r"(.+)@(\d+)", checkpoint)
        size = None
        if match and match[1] not in self.presets and match[1] != "tiny":
            checkpoint, size = match[1], int(match[2])
        super().__init__(checkpoint, layer, frozen, dtype)
        if size is not None:  # run at R x R pixels: position embeddings are interpolated by the model
            self.processor.size, self.processor.crop_size = {"shortest_edge": size}, {"height": size, "width": size}
            self.checkpoint = f"{checkpoint}@{size}"
        crop = self.processor.crop_size["height"]
        side = crop // self.model.config.patch_size
        self.info = dataclasses.replace(self.info, grid=(side, side), image_size=crop)
        self.registers = getattr(self.model.config, "num_register_tokens", 0)

    blocks_paths = ("encoder.layer",)
    attention_path = "attention"

    @property
    def prefix_tokens(self) -> int:  # CLS and the register tokens
        return 1 + self.registers

    def _build_preset(self, out_dir, params: dict[str, Any]) -> None:
        torch.manual_seed(0)
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**params)).save_pretrained(out_dir)
        crop = params["image_size"] if params["image_size"] < 224 else 224  # the hub's 224 crop for real geometries
        BitImageProcessor(
            size={"shortest_edge": crop},
            crop_size={"height": crop, "width": crop},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ).save_pretrained(out_dir)

    def _encode(self, pixel_values: torch.Tensor, with_cls_attention: bool) -> VisionFeatures:
        if with_cls_attention:
            self._ensure_eager()
        out = self.model(
            pixel_values=pixel_values.to(self.model.dtype),
            output_hidden_states=True,
            output_attentions=with_cls_attention,
        )
        hidden = out.hidden_states[self.block + 1]
        first = 1 + self.registers
        attention = out.attentions[self.block][:, :, 0, first:] if with_cls_attention else None
        return VisionFeatures(patches=hidden[:, first:], cls=hidden[:, 0], grid=self.info.grid, cls_attention=attention)
