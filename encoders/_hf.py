"""Shared loading for transformers vision towers (CLIP, SigLIP): tiny preset, local directory or hub id."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor

from connector_zoo.hf import load_pretrained, preset_dir, random_geometry
from encoders.base import EncoderInfo, VisionEncoder, VisionFeatures

# Tiny ViT presets shared by the transformers towers: an 8x8 grid of 8-px patches on 64-px images (the mini world's
# default), a 24x24 grid like CLIP-L/14-336's 576 patches and a 27x27 grid like SigLIP-so400m/14-384's 729, at toy
# width.
TINY_VIT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=8
)
TINY_PRESETS = {
    "tiny": TINY_VIT,
    "tiny-24": {**TINY_VIT, "image_size": 96, "patch_size": 4},
    "tiny-27": {**TINY_VIT, "image_size": 108, "patch_size": 4},
}

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


class HFVisionEncoder(VisionEncoder):
    """Shared loading for transformers vision towers (CLIP, SigLIP): preset, local directory or hub id."""

    model_cls: type
    config_cls: type
    processor_cls: type
    #: hub id -> the vision config of the real checkpoint, for ``random:<hub id>[:layers=N]`` (see connector_zoo.hf)
    geometries: dict[str, dict[str, Any]] = {}

    def __init__(self, checkpoint: str, layer: int = -2, frozen: bool = True, dtype: str | None = None):
        super().__init__(checkpoint, layer, frozen, dtype)
        name, params = self.preset_params(checkpoint)
        path = checkpoint
        random = random_geometry(checkpoint, self.geometries, "num_hidden_layers", default_layers=2)
        if random:
            name, params = random
        if params is not None:
            path = preset_dir(self.registered_name, name, params, lambda d: self._build_preset(d, params))
        self.source = str(path)  # where the weights were read from
        self.model = load_pretrained(
            self.model_cls.from_pretrained,
            path,
            f"{self.registered_name} vision model",
            dtype=getattr(torch, self.dtype_name),
        )
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, path, f"{self.registered_name} processor")
        cfg = self.model.config
        side = cfg.image_size // cfg.patch_size
        self.info = EncoderInfo(
            hidden_size=cfg.hidden_size,
            grid=(side, side),
            image_size=cfg.image_size,
            has_cls=self.has_cls,
            num_heads=cfg.num_attention_heads,
            num_layers=cfg.num_hidden_layers,
        )
        self.block = self.block_index(cfg.num_hidden_layers)
        self.freeze(frozen)

    has_cls = True

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None = None, **kwargs: Any) -> HFVisionEncoder:
        return cls(checkpoint or cls.default_checkpoint, **kwargs)

    def _build_preset(self, out_dir, params: dict[str, Any]) -> None:
        torch.manual_seed(0)
        self.model_cls(self.config_cls(**params)).save_pretrained(out_dir)
        size = params["image_size"]
        self.processor_cls(
            size=self._processor_size(size),
            crop_size={"height": size, "width": size},
            image_mean=OPENAI_MEAN,
            image_std=OPENAI_STD,
        ).save_pretrained(out_dir)

    def _processor_size(self, size: int) -> dict[str, int]:
        return {"shortest_edge": size}

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def preprocess_signature(self) -> dict[str, Any]:
        return self.processor.to_dict()

    #: where the blocks may sit in the transformers model (the first that exists: transformers 5 releases differ on
    #: whether a vision model wraps a ``vision_model``), and each block's attention module
    blocks_paths = ("vision_model.encoder.layers", "encoder.layers")
    attention_path = "self_attn"

    def blocks(self) -> nn.ModuleList:
        for path in self.blocks_paths:
            try:
                return self.model.get_submodule(path)
            except AttributeError:
                continue
        raise ValueError(
            f"{self.registered_name}: no transformer blocks at {' or '.join(self.blocks_paths)} in "
            f"{type(self.model).__name__}"
        )

    def query_key(self, block: nn.Module, sink: dict[str, torch.Tensor]) -> list:
        attention = block.get_submodule(self.attention_path)
        put = lambda name: lambda module, args, out: sink.__setitem__(name, out)  # noqa: E731
        return [attention.q_proj.register_forward_hook(put("q")), attention.k_proj.register_forward_hook(put("k"))]

    def _ensure_eager(self) -> None:
        if self.model.config._attn_implementation != "eager":
            self.model.set_attn_implementation("eager")

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values.to(self.model.dtype)).pooler_output

    def pooled_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, VisionFeatures]:
        # one forward: the model's own output (its pooler_output: CLIP's normed CLS, SigLIP's probe, DINOv2's normed
        # CLS) caught by a hook while the family's _encode reads its hidden states
        caught = []
        handle = self.model.register_forward_hook(lambda module, args, out: caught.append(out))
        try:
            features = self(pixel_values)
        finally:
            handle.remove()
        return caught[0].pooler_output, features

    def save_checkpoint(self, directory) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
