"""``AutoProcessor`` for a connector-zoo model directory, so ``pipeline("image-text-to-text", model=dir)`` works.

:class:`ConnectorZooProcessor` = :class:`ConnectorZooImageProcessor` (the vision encoder's own preprocessing) + the
LLM's tokenizer (with its ``<image>`` token) + a chat template: the LLM's own template behind a prefix that turns
transformers' content lists (``[{"type": "image"}, {"type": "text", "text": ...}]``) into this project's prompt
text (``<image>\\n`` before the text), so a chat rendered here is byte for byte the prompt ``bench generate`` builds.
Each image stays one ``<image>`` token; the model splices the connector's visual tokens in its place.

The image processor computes pixels with the encoder's ``preprocess`` (transformers' image processor for CLIP,
SigLIP and DINOv2, timm's transform for EVA, both parts' for ``fused``). It takes the encoder of a
:class:`ConnectorZooForConditionalGeneration` already loaded in this process with the same spec (``pipeline`` loads
the model first); otherwise it builds the encoder once from the spec (reading its weights a second time).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from encoders import build_encoder
from encoders.anyres import AnyResGeometry

IMAGE_TOKEN = "<image>"
# transformers' content lists -> the prompt text this project trains on; then the LLM's own template
FLATTEN = (
    "{%- set ns = namespace(messages=[]) -%}\n"
    "{%- for m in messages -%}\n"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}\n"
    "{%- else -%}{%- set ns2 = namespace(text='') -%}\n"
    "{%- for part in m['content'] -%}\n"
    "{%- if part['type'] == 'image' -%}{%- set ns2.text = ns2.text + '" + IMAGE_TOKEN + "\\n' -%}\n"
    "{%- elif part['type'] == 'text' -%}{%- set ns2.text = ns2.text + part['text'] -%}{%- endif -%}\n"
    "{%- endfor -%}{%- set text = ns2.text -%}{%- endif -%}\n"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text}] -%}\n"
    "{%- endfor -%}\n"
    "{%- set messages = ns.messages -%}\n"
)
#: encoders of models loaded in this process, by their spec (JSON): the processor reuses them instead of a second copy
_LOADED: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def spec_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


def remember_encoder(encoder) -> None:
    _LOADED[spec_key(encoder.spec)] = encoder


class ConnectorZooImageProcessor(BaseImageProcessor):
    """The vision encoder's own preprocessing, named by the encoder spec (``{"name", "checkpoint", **settings}``);
    with ``tiling`` (the model's AnyRes spec) a row per view and each image's ``image_sizes``."""

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, encoder: dict[str, Any] | None = None, tiling: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.tiling = tiling
        self._built = None
        self.directory: str | None = None  # where an embedded encoder (checkpoint "encoder") lives

    def resolved_spec(self) -> dict[str, Any]:
        spec = dict(self.encoder or {})
        if spec.get("checkpoint") == "encoder" and self.directory and (Path(self.directory) / "encoder").is_dir():
            spec["checkpoint"] = str(Path(self.directory) / "encoder")
        return spec

    def vision_encoder(self):
        spec = self.resolved_spec()
        found = _LOADED.get(spec_key(spec))
        if found is not None:
            return found
        if self._built is None:
            self._built = build_encoder(**spec)
        return self._built

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        images = [im.convert("RGB") for im in ([images] if isinstance(images, Image.Image) else list(images))]
        encoder = self.vision_encoder()
        if not self.tiling:
            return BatchFeature({"pixel_values": encoder.preprocess(images)}, tensor_type=return_tensors)
        geometry = AnyResGeometry(tuple(map(tuple, self.tiling["grid_pinpoints"])), encoder.info.image_size)
        pixels = encoder.preprocess([view for im in images for view in geometry.views(im)])
        sizes = torch.tensor([[im.height, im.width] for im in images])
        return BatchFeature({"pixel_values": pixels, "image_sizes": sizes}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for private in ("_built", "directory"):
            out.pop(private, None)
        return out


class ConnectorZooProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template of a connector-zoo model (see the module docstring)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        prepend_bos: bool = False,
        **kwargs: Any,
    ):
        self.prepend_bos = prepend_bos
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_vlm(cls, vlm) -> ConnectorZooProcessor:
        tok = vlm.llm.tokenizer
        template = tok.chat_template
        kwargs = vlm.llm.generation_template_kwargs
        if kwargs:  # e.g. Qwen3's enable_thinking=False, as bench generate renders the prompt
            template = "".join(f"{{%- set {k} = {json.dumps(v).lower()} -%}}\n" for k, v in kwargs.items()) + template
        return cls(
            ConnectorZooImageProcessor(
                encoder=vlm.encoder.spec, tiling=None if vlm.tiling is None else vlm.tiling.spec
            ),
            tok,
            chat_template=FLATTEN + template,
            prepend_bos=bool(vlm.llm.prepend_bos),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any) -> ConnectorZooProcessor:
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            directory = Path(snapshot_download(str(pretrained_model_name_or_path)))
        processor = super().from_pretrained(str(directory), *args, **kwargs)
        processor.image_processor.directory = str(directory)
        return processor

    def __call__(
        self, images=None, text=None, return_tensors: str | None = "pt", padding: bool | str = True, **kwargs: Any
    ) -> BatchFeature:
        """Token ids of each prompt as the LLM backend tokenizes it (one ``<image>`` token per image, left-padded),
        attention mask, and pixel values of the images in order."""
        texts = [text] if isinstance(text, str) else list(text or [])
        tok = self.tokenizer
        rows = []
        for t in texts:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            if self.prepend_bos and tok.bos_token_id is not None and not t.startswith(tok.bos_token or "\0"):
                ids = [tok.bos_token_id, *ids]
            rows.append(ids)
        n_tokens = sum(r.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) for r in rows)
        flat = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        flat = [im for group in flat for im in (group if isinstance(group, (list, tuple)) else [group])]
        if len(flat) != n_tokens:
            raise ValueError(
                f"{len(flat)} image(s) for {n_tokens} {IMAGE_TOKEN} token(s) in the text: give one image "
                f"per {IMAGE_TOKEN} (a chat's image entries become one each)"
            )
        width = max((len(r) for r in rows), default=0)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        data: dict[str, Any] = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long),
        }
        if flat:
            data.update(self.image_processor.preprocess(flat, return_tensors="pt"))
        return BatchFeature(data, tensor_type=return_tensors)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs: Any):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
