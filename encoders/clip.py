"""CLIP ViT through transformers' ``CLIPVisionModel`` (LLaVA-1.5: ``openai/clip-vit-large-patch14-336``).

Features are ``hidden_states[layer]`` (default -2, the penultimate block's output, before ``post_layernorm``), split
into the CLS token (index 0) and the N patch tokens. The CLS-attention row of the same layer is taken from the
model's own eager attention probabilities: ``attentions[block][:, :, 0, 1:]`` -> (B, H, N). transformers' SDPA kernel
returns no weights, so asking for CLS attention switches the model to eager attention once (same numbers).
"""

from __future__ import annotations

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from encoders import register
from encoders._hf import TINY_PRESETS, HFVisionEncoder
from encoders.base import VisionFeatures


@register("clip")
class CLIPEncoder(HFVisionEncoder):
    """CLIP ViT (transformers CLIPVisionModel): penultimate layer, CLS kept apart, CLS-attention for pruning."""

    model_cls = CLIPVisionModel
    config_cls = CLIPVisionConfig
    processor_cls = CLIPImageProcessor
    default_checkpoint = "tiny"
    presets = TINY_PRESETS
    real_checkpoints = ("openai/clip-vit-large-patch14-336", "openai/clip-vit-base-patch32")
    geometries = {  # the vision configs of the real checkpoints
        "openai/clip-vit-large-patch14-336": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        "openai/clip-vit-base-patch32": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
            projection_dim=512,
            hidden_act="quick_gelu",
        ),
    }

    def _encode(self, pixel_values: torch.Tensor, with_cls_attention: bool) -> VisionFeatures:
        if with_cls_attention:
            self._ensure_eager()
        dtype = self.model.dtype
        out = self.model(
            pixel_values=pixel_values.to(dtype), output_hidden_states=True, output_attentions=with_cls_attention
        )
        hidden = out.hidden_states[self.block + 1]
        cls_attention = out.attentions[self.block][:, :, 0, 1:] if with_cls_attention else None
        return VisionFeatures(patches=hidden[:, 1:], cls=hidden[:, 0], grid=self.info.grid, cls_attention=cls_attention)
