"""LLM-side visual-token hooks: the part of the LLM backend contract that lets a reducer act *inside* the LLM.

FastV (and any plugin of the same kind) decides which image tokens the later decoder layers may see from the
attention an earlier layer paid them. A connector that wants this sets ``llm_hook`` to a :class:`VisualTokenHook`;
the composed model then runs every forward and generation of the LLM inside :func:`visual_token_hook`:

- ``VisualSpans``: per row of the padded batch, where its image tokens start, how many there are, and the position
  whose attention scores them (the last prompt token: the last position at generation, the token before the first
  labelled one when teacher-forced);
- after decoder layer ``hook.layer`` (counting from 1) has run on the prompt, ``hook.select(attention, spans)`` gets
  that layer's attention from each row's query position (mean over heads, (B, S)) and returns the (B, S) key
  positions to drop. Every layer keeps the model's own attention implementation (SDPA by default): with a KV cache
  (generation, prefill) the scoring row is computed again from the layer's cached keys and that one position's
  query; without one (a teacher-forced forward) the scoring layer alone runs eager attention on the prompt, whose
  probabilities are read;
- the dropped positions are **removed**: every later layer runs on the kept positions only (hidden states, rotary
  embeddings, attention mask and position ids gathered; rows of a batch that keep fewer positions are padded with
  masked slots), so their KV cache holds the kept positions only, and each generated token attends to those. Kept
  tokens keep their positions (RoPE), as FastV's in-place variant does. After the last layer the kept rows are put
  back in place (a dropped position carries its hidden state of layer K, which no label and no generated token
  reads), so logits keep the prompt's shape.

``remove=False`` keeps the older, slower path, used by the tests as a second reference: every layer runs with eager
attention and later layers get a mask in which no query can see a dropped position (the dropped rows are computed
and never read: the same logits at every kept position, none of the saving).

Decoder layers are found at ``model.model.layers`` (Llama, Qwen, Mistral and most transformers decoders; PEFT-wrapped
models through ``get_base_model()``). Activation (gradient) checkpointing recomputes layers in backward, after this
context has closed, so a hook refuses to run under it with gradients on. The removal machinery is in
``llms/removal.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from connector_zoo.settings import SettingError
from llms.removal import _Pruning, additive_mask, row_attention, row_attention_possible


@dataclass
class VisualSpans:
    start: torch.Tensor  # (B,) first image token of each row in the padded sequence
    length: torch.Tensor  # (B,) image tokens per row (0: no image)
    query: torch.Tensor  # (B,) the position whose attention scores the image tokens
    padding: torch.Tensor | None = None  # (B, S) True at the batch's padding positions (removed with the dropped)

    @staticmethod
    def of(
        image_at: list[int | None],
        counts: list[int],
        mask: torch.Tensor,
        labels: torch.Tensor | None,
        left_padded: bool,
        ignore_index: int = -100,
    ) -> VisualSpans:
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
        return VisualSpans(start, length, query, mask == 0)

    def expand(self, batch: int) -> VisualSpans:
        """The spans of a batch that generation expanded (beams, several samples per prompt: rows repeated)."""
        if batch == len(self.start):
            return self
        factor = batch // len(self.start)
        padding = None if self.padding is None else self.padding.repeat_interleave(factor, dim=0)
        return VisualSpans(*(t.repeat_interleave(factor) for t in (self.start, self.length, self.query)), padding)


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
def visual_token_hook(model: nn.Module, hook: VisualTokenHook | None, spans: VisualSpans | None, remove: bool = True):
    """Run ``model`` (a transformers causal LM) with ``hook`` applied; a no-op when ``hook`` is None. ``remove``:
    take the dropped positions out of the later layers (the default), else mask them (see the module docstring)."""
    if hook is None:
        yield
        return
    if torch.is_grad_enabled() and checkpointing(model):
        raise SettingError(
            f"{type(hook).__name__} acts inside the LLM through hooks that activation checkpointing "
            "would bypass (its layers are recomputed in backward, after the hooks are gone): train "
            "with --no-gradient-checkpointing"
        )
    layers = decoder_layers(model)
    if not 1 <= hook.layer < len(layers):
        raise SettingError(
            f"{type(hook).__name__}: layer={hook.layer} must leave later layers to prune in an LLM of "
            f"{len(layers)} decoder layers (1 <= layer < {len(layers)})"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    state = _Pruning(hook.layer)

    def capture(module, args, output):
        weights = output[1]  # eager attention: (B, H, Q, S)
        if weights is None or weights.shape[2] == 1 or state.decided:
            return  # a generated token: the prompt's choice stands
        rows = torch.arange(weights.shape[0], device=weights.device)
        batch_spans = spans.expand(weights.shape[0])
        attention = weights[rows, :, batch_spans.query.to(weights.device)].float().mean(dim=1)  # (B, S)
        state.choose(hook.select(attention, batch_spans).to(weights.device), batch_spans.padding if remove else None)

    if not remove:
        handles = [layers[hook.layer - 1].self_attn.register_forward_hook(capture)]
        handles += [layer.register_forward_pre_hook(state.masking, with_kwargs=True) for layer in layers[hook.layer :]]
        base.set_attn_implementation("eager")
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            base.set_attn_implementation(before)
        return

    scorer = layers[hook.layer - 1].self_attn
    pending: dict = {}

    def score_before(module, args, kwargs):  # the scoring layer's attention, on the prompt only
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden.shape[1] == 1 or state.decided:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if row_attention_possible(module, cache, hook.layer - 1):
            # the layer runs as it would (SDPA); its keys are read back from the cache afterwards and only the
            # scoring row's query is computed again
            pending.update(hidden=hidden, position_embeddings=kwargs["position_embeddings"], cache=cache)
            return None
        base.config._attn_implementation = "eager"  # no cache (teacher forcing): the layer's own probabilities
        pending.update(eager=True)
        return args, {**kwargs, "attention_mask": additive_mask(kwargs.get("attention_mask"), hidden)}

    def score_after(module, args, output):
        if pending.pop("eager", False):
            base.config._attn_implementation = before
            capture(module, args, output)
        elif pending:
            batch_spans = spans.expand(pending["hidden"].shape[0])
            keys = pending["cache"].layers[hook.layer - 1].keys
            attention = row_attention(module, pending["hidden"], pending["position_embeddings"], keys, batch_spans)
            state.choose(hook.select(attention, batch_spans).to(attention.device), batch_spans.padding)
        pending.clear()

    first, last = layers[hook.layer], layers[-1]
    handles = [
        scorer.register_forward_pre_hook(score_before, with_kwargs=True),
        scorer.register_forward_hook(score_after),
        first.register_forward_pre_hook(lambda m, a, k: state.enter(a, k, before), with_kwargs=True),
        last.register_forward_hook(lambda m, a, k, out: state.leave(out), with_kwargs=True),
    ]
    handles += [layer.register_forward_pre_hook(state.reuse, with_kwargs=True) for layer in layers[hook.layer + 1 :]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        base.config._attn_implementation = before


def checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model recomputes its layers in backward (the attribute's name changed in 5.x)."""
    name = (
        "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name, False))
