"""LLM-side visual-token hooks: the part of the LLM backend contract that lets a reducer act *inside* the LLM.

FastV (and any plugin of the same kind) decides which image tokens the later decoder layers may see from the
attention an earlier layer paid them. A connector that wants this sets ``llm_hook`` to a :class:`VisualTokenHook`;
the composed model then runs every forward and generation of the LLM inside :func:`visual_token_hook`:

- ``VisualSpans``: per row of the padded batch, where its image tokens start, how many there are, and the position
  whose attention scores them (the last prompt token: the last position at generation, the token before the first
  labelled one when teacher-forced);
- after decoder layer ``hook.layer`` (counting from 1) has run on the prompt, ``hook.select(attention, spans)`` gets
  that layer's attention from each row's query position (mean over heads, (B, S)) and returns the (B, S) key
  positions to drop;
- every later layer, at the prompt and at each generated token, gets an attention mask in which no query can see a
  dropped position. Kept tokens keep their positions (RoPE), so their outputs equal those of FastV's in-place pruning
  (the dropped rows are still computed and never read: the cost saving is not realised, the result is the same).

The LLM runs with eager attention inside the hook (the attention weights are needed); it is restored afterwards.
Decoder layers are found at ``model.model.layers`` (Llama, Qwen, Mistral and most transformers decoders; PEFT-wrapped
models through ``get_base_model()``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from connector_zoo.settings import SettingError


@dataclass
class VisualSpans:
    start: torch.Tensor  # (B,) first image token of each row in the padded sequence
    length: torch.Tensor  # (B,) image tokens per row (0: no image)
    query: torch.Tensor  # (B,) the position whose attention scores the image tokens

    @staticmethod
    def of(image_at: list[int | None], counts: list[int], mask: torch.Tensor, labels: torch.Tensor | None,
           left_padded: bool, ignore_index: int = -100) -> VisualSpans:  # fmt: skip
        """From each row's ``<image>`` position in its unpadded ids, its visual-token count and the splice's
        attention mask and labels."""
        B, L = mask.shape
        lengths = mask.sum(1)
        offset = (L - lengths) if left_padded else torch.zeros_like(lengths)
        start = torch.tensor([p if p is not None else 0 for p in image_at], device=mask.device) + offset
        length = torch.tensor([c if p is not None else 0 for p, c in zip(image_at, counts)], device=mask.device)
        query = offset + lengths - 1
        if labels is not None:
            labelled = labels != ignore_index
            first = labelled.int().argmax(1) - 1
            query = torch.where(labelled.any(1), first, query)
        return VisualSpans(start, length, query)

    def expand(self, batch: int) -> VisualSpans:
        """The spans of a batch that generation expanded (beams, several samples per prompt: rows repeated)."""
        if batch == len(self.start):
            return self
        factor = batch // len(self.start)
        return VisualSpans(*(t.repeat_interleave(factor) for t in (self.start, self.length, self.query)))


class VisualTokenHook:
    """Base class: after decoder layer ``layer`` (1-based), ``select`` names the key positions to drop."""

    layer: int = 2

    def select(self, attention: torch.Tensor, spans: VisualSpans) -> torch.Tensor:
        """``attention`` (B, S): head-mean attention of each row's query position; -> (B, S) bool, True = drop."""
        raise NotImplementedError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(base).__name__}: no decoder layers at .model.layers; visual-token hooks need them")
    return layers


@contextlib.contextmanager
def visual_token_hook(model: nn.Module, hook: VisualTokenHook | None, spans: VisualSpans | None):
    """Run ``model`` (a transformers causal LM) with ``hook`` applied; a no-op when ``hook`` is None."""
    if hook is None:
        yield
        return
    layers = decoder_layers(model)
    if not 1 <= hook.layer < len(layers):
        raise SettingError(f"{type(hook).__name__}: layer={hook.layer} must leave later layers to prune in an LLM of "
                           f"{len(layers)} decoder layers (1 <= layer < {len(layers)})")  # fmt: skip
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    state: dict[str, torch.Tensor | None] = {"drop": None}

    def capture(module, args, output):
        weights = output[1]  # eager attention: (B, H, Q, S)
        if weights is None or weights.shape[2] == 1 or state["drop"] is not None:
            return  # a generated token: the prompt's choice stands
        rows = torch.arange(weights.shape[0], device=weights.device)
        batch_spans = spans.expand(weights.shape[0])
        attention = weights[rows, :, batch_spans.query.to(weights.device)].float().mean(dim=1)  # (B, S)
        state["drop"] = hook.select(attention, batch_spans)

    def restrict(module, args, kwargs):
        drop, mask = state["drop"], kwargs.get("attention_mask")
        if drop is None or mask is None:
            return None
        S = mask.shape[-1]
        cols = torch.zeros(drop.shape[0], S, dtype=torch.bool, device=mask.device)
        cols[:, : min(S, drop.shape[1])] = drop[:, :S].to(mask.device)
        kwargs["attention_mask"] = mask.masked_fill(cols[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    handles = [layers[hook.layer - 1].self_attn.register_forward_hook(capture)]
    handles += [layer.register_forward_pre_hook(restrict, with_kwargs=True) for layer in layers[hook.layer :]]
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        base.set_attn_implementation(before)
