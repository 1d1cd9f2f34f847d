"""EVA-CLIP ViT-g/14 as in BLIP-2 and MiniGPT-4, through timm's ``Eva`` (the trunk open_clip's ``EVA01-g-14`` uses).

Real size: width 1408, patch 14, 224 px -> 16x16 = 256 patches + CLS, 40 blocks, of which LAVIS
(``lavis/models/eva_vit.py``) uses 39: the output of block 38 is exactly ``hidden_states[-2]``, this project's default
layer. Features come from timm's intermediate-feature API (``forward_intermediates``, no final norm), CLS kept apart.

Checkpoints: ``tiny`` (random, built and saved with timm's ``save_for_hf`` and loaded back as ``local-dir:``), a local
directory in that layout, a timm name such as ``eva_giant_patch14_224.clip_ft_in1k`` (Hugging Face cache, offline
works) or ``open_clip:EVA01-g-14/laion400m_s11b_b41k`` (open_clip cache; its visual trunk is taken).

CLS attention: timm's attention returns no weights, so the selected block runs its non-fused path and the softmax
probabilities are read at its ``attn_drop`` (identity at eval), giving ``attn[:, :, 0, 1:]`` -> (B, H, N).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from connector_zoo.hf import load_pretrained, preset_dir
from encoders import register
from encoders.base import EncoderInfo, VisionEncoder, VisionFeatures

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@register("eva-vit-g")
class EVAViTG(VisionEncoder):
    """EVA-CLIP ViT-g/14 (timm Eva, as in BLIP-2 / MiniGPT-4): penultimate block, CLS kept apart."""

    architecture = "eva_giant_patch14_224"
    size_keys = ("img_size", "patch_size")
    default_checkpoint = "tiny"
    presets = {
        "tiny": dict(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
        "tiny-24": dict(img_size=96, patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
        "tiny-27": dict(img_size=108, patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
    }
    real_checkpoints = ("eva_giant_patch14_224.clip_ft_in1k", "open_clip:EVA01-g-14/laion400m_s11b_b41k")

    def __init__(self, checkpoint: str, layer: int = -2, frozen: bool = True, dtype: str | None = None):
        super().__init__(checkpoint, layer, frozen, dtype)
        self.model = self._load(checkpoint).to(getattr(torch, self.dtype_name))
        cfg = resolve_data_config({}, model=self.model)
        self.data_config = cfg
        self.transform = create_transform(**cfg, is_training=False)
        side = cfg["input_size"][-1] // self.model.patch_embed.patch_size[0]
        self.info = EncoderInfo(
            hidden_size=self.model.embed_dim,
            grid=(side, side),
            image_size=cfg["input_size"][-1],
            has_cls=self.model.num_prefix_tokens == 1,
            num_heads=self.model.blocks[0].attn.num_heads,
            num_layers=len(self.model.blocks),
        )
        if self.model.num_prefix_tokens != 1:
            raise ValueError(
                f"eva-vit-g expects one CLS prefix token; {checkpoint!r} has {self.model.num_prefix_tokens}"
            )
        self.block = self.block_index(len(self.model.blocks))
        self._attn_probs: torch.Tensor | None = None
        self._final: list[torch.Tensor] | None = None  # a list while pooled_features runs: the final tokens go there
        self.freeze(frozen)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None = None, **kwargs: Any) -> EVAViTG:
        return cls(checkpoint or cls.default_checkpoint, **kwargs)

    def _load(self, checkpoint: str) -> torch.nn.Module:
        self.model_args: dict[str, Any] = {}  # architecture arguments of a local timm directory, to save it again
        name, params = self.preset_params(checkpoint)
        if params is not None:
            checkpoint = str(preset_dir("eva-vit-g", name, params, self._build_preset))
        self.source = checkpoint  # where the weights were read from
        if checkpoint.startswith("open_clip:"):
            import open_clip

            name, _, tag = checkpoint.removeprefix("open_clip:").partition("/")
            model = load_pretrained(
                lambda n, **kw: open_clip.create_model(n, **kw), name, "open_clip EVA model", pretrained=tag or None
            )
            return model.visual.trunk
        if Path(checkpoint).is_dir():
            self.model_args = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_args", {})
            checkpoint = f"local-dir:{checkpoint}"
        return load_pretrained(timm.create_model, checkpoint, "timm EVA model", pretrained=True, num_classes=0)

    def _build_preset(self, out_dir: Path) -> None:
        from timm.models import save_for_hf

        torch.manual_seed(0)
        args = dict(self.preset_params(self.checkpoint)[1])
        model = timm.create_model(self.architecture, pretrained=False, num_classes=0, **args)
        size = args["img_size"]
        model.pretrained_cfg = dict(
            model.pretrained_cfg,
            input_size=(3, size, size),
            mean=OPENAI_MEAN,
            std=OPENAI_STD,
            interpolation="bicubic",
            crop_pct=1.0,
            crop_mode="center",
            num_classes=0,
        )
        save_for_hf(model, str(out_dir), model_args=args, safe_serialization=True)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixel_values), pre_logits=True)

    def pooled_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, VisionFeatures]:
        # one forward: timm's forward_intermediates also returns the final (normed) tokens, forward_features' output
        self._final = []
        try:
            features = self(pixel_values)
            (final,) = self._final
        finally:
            self._final = None
        return self.model.forward_head(final, pre_logits=True), features

    def save_checkpoint(self, directory) -> None:
        from timm.models import save_for_hf

        save_for_hf(self.model, str(directory), model_args=self.model_args, safe_serialization=True)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(im.convert("RGB")) for im in images])

    def preprocess_signature(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}

    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def query_key(self, block: nn.Module, sink: dict[str, torch.Tensor]) -> list:
        """timm's EvaAttention projects q, k, v in one fused matmul that no module hook sees: its input is caught
        and the query and key projections recomputed from the same weights and biases (before q/k norms and RoPE)."""
        attention = block.attn

        def project(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            if attention.qkv is not None:
                bias = attention.qkv.bias
                if attention.q_bias is not None:
                    bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
                q, k, _ = F.linear(x, attention.qkv.weight, bias).chunk(3, dim=-1)
            else:
                q, k = attention.q_proj(x), attention.k_proj(x)
            sink["q"], sink["k"] = q, k

        return [attention.register_forward_pre_hook(project, with_kwargs=True)]

    def _capture(self, module, inputs, output) -> None:
        self._attn_probs = output

    def _encode(self, pixel_values: torch.Tensor, with_cls_attention: bool) -> VisionFeatures:
        attn = self.model.blocks[self.block].attn
        hook = None
        if with_cls_attention:
            attn.fused_attn = False  # the eager path computes softmax(q k^T * scale) explicitly
            hook = attn.attn_drop.register_forward_hook(self._capture)
        try:
            dtype = next(self.model.parameters()).dtype
            keep_final = self._final is not None  # pooled_features asks for the final tokens too
            out = self.model.forward_intermediates(
                pixel_values.to(dtype),
                indices=[self.block],
                return_prefix_tokens=True,
                norm=False,
                output_fmt="NLC",
                intermediates_only=not keep_final,
            )
            if keep_final:
                final, out = out
                self._final.append(final)
            ((patches, prefix),) = out
        finally:
            if hook is not None:
                hook.remove()
        cls_attention = self._attn_probs[:, :, 0, 1:] if with_cls_attention else None
        self._attn_probs = None
        return VisionFeatures(patches=patches, cls=prefix[:, 0], grid=self.info.grid, cls_attention=cls_attention)
