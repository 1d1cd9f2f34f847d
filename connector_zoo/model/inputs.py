"""What goes in and out of the composed model: ``VLMInputs`` (one batch, unpadded per sample), ``VLMOutput``
(every field declared, so wrappers keep them) and ``SampleTooLong``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from encoders.base import VisionFeatures


class SampleTooLong(ValueError):
    """A sample's text + visual tokens exceed the LLM context budget."""


@dataclass
class VLMOutput(ModelOutput):
    """The composed model's output. Every field is declared, so wrappers that rebuild outputs (accelerate's fp32
    conversion under mixed precision, DDP, FSDP) keep them all.

    loss:          LM loss + the connector's auxiliary loss (what is trained), when labels are given
    lm_loss:       the LM loss alone (what validation reports)
    aux_loss:      the connector's auxiliary loss, or None
    logits:        (B, L, V); with labels, only the labelled positions' rows (n, V) unless full_logits
    visual_tokens: (B_img,) visual tokens per image, or None for a text-only batch
    positions:     rows x width of the LLM's input (tokens + padding: what the LLM computed over)
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    visual_tokens: torch.LongTensor | None = None
    positions: torch.LongTensor | None = None


@dataclass
class VLMInputs:
    """One batch for the composed model. ``input_ids``/``labels`` are unpadded per sample.

    Exactly one of ``pixel_values`` (B_img, 3, S, S) and ``features`` (precomputed, e.g. from the feature cache) is
    given when any sample has an image; ``has_image[b]`` says which samples own the rows, in order. A tiling model
    (AnyRes) takes a row per view instead (each image's global view, then its tiles) and ``image_sizes``, each
    image's original (height, width), from which the views per image follow.
    """

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor] | None = None
    pixel_values: torch.Tensor | None = None
    features: VisionFeatures | None = None
    has_image: list[bool] | None = None
    image_sizes: list[tuple[int, int]] | None = None
    #: training only: several samples per row (``VLM.splice``), no attention across them, no padding between them
    pack: bool = False
    #: per sample, its tokens' position ids where they are not their index (a sample of branches,
    #: ``LLMBackend.encode_branches``: trained on packed rows under varlen attention only), else None
    positions: list[torch.Tensor | None] | None = None
