"""SigLIP through transformers' ``SiglipVisionModel`` (LLaVA-OneVision: ``google/siglip-so400m-patch14-384``).

SigLIP has **no CLS token**: every one of the N = h*w tokens is a patch and none is dropped. Features are
``hidden_states[layer]`` (default -2). For CLS-attention pruning SigLIP offers no CLS row; the score used instead is
the attention of the multi-head attention-pooling head's learned probe over the final-layer patches
(``head.attention`` with per-head weights), which is what SigLIP's pooled embedding attends to. Note that this score
comes from the last layer, not the selected one.
"""

from __future__ import annotations

import torch
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from encoders import register
from encoders._hf import TINY_PRESETS, HFVisionEncoder
from encoders.base import VisionFeatures


@register("siglip")
class SigLIPEncoder(HFVisionEncoder):
    """SigLIP ViT (transformers SiglipVisionModel): no CLS token; pruning score from the attention-pooling probe."""

    model_cls = SiglipVisionModel
    config_cls = SiglipVisionConfig
    processor_cls = SiglipImageProcessor
    has_cls = False
    prefix_tokens = 0
    default_checkpoint = "tiny"
    presets = TINY_PRESETS
    real_checkpoints = ("google/siglip-so400m-patch14-384", "google/siglip-base-patch16-224")
    geometries = {  # the vision configs of the real checkpoints
        "google/siglip-so400m-patch14-384": dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
        ),
        "google/siglip-base-patch16-224": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
        ),
    }

    def _processor_size(self, size: int) -> dict[str, int]:
        return {"height": size, "width": size}

    def _encode(self, pixel_values: torch.Tensor, with_cls_attention: bool) -> VisionFeatures:
        out = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.block + 1]
        score = self._probe_attention(out.last_hidden_state) if with_cls_attention else None
        return VisionFeatures(patches=hidden, cls=None, grid=self.info.grid, cls_attention=score)

    def _probe_attention(self, last_hidden: torch.Tensor) -> torch.Tensor:
        head = getattr(getattr(self.model, "vision_model", self.model), "head", None)
        if head is None:
            raise ValueError(
                f"siglip checkpoint {self.checkpoint!r} has no attention-pooling head (vision_use_head=False), so it "
                "has no CLS-attention score for cls_prune; use a checkpoint with the head or another connector"
            )
        probe = head.probe.expand(last_hidden.shape[0], -1, -1)
        _, weights = head.attention(probe, last_hidden, last_hidden, need_weights=True, average_attn_weights=False)
        return weights[:, :, 0, :]  # (B, H, N)
