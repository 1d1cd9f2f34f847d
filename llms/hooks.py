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
models through ``get_base_model()``). Gradient checkpointing recomputes layers after this context has closed, so the
composed model refuses to train with a hook under it.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from connector_zoo.settings import SettingError


@dataclass
class VisualSpans:
    start: torch.Tensor  # (B,) first image token of each row in the padded sequence
    length: torch.Tensor  # (B,) image tokens per row (0: no image)
    query: torch.Tensor  # (B,) the position whose attention scores the image tokens
    padding: torch.Tensor | None = None  # (B, S) True at the batch's padding positions (removed with the dropped)

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
def visual_token_hook(model: nn.Module, hook: VisualTokenHook | None, spans: VisualSpans | None,
                      remove: bool = True):  # fmt: skip
    """Run ``model`` (a transformers causal LM) with ``hook`` applied; a no-op when ``hook`` is None. ``remove``:
    take the dropped positions out of the later layers (the default), else mask them (see the module docstring)."""
    if hook is None:
        yield
        return
    layers = decoder_layers(model)
    if not 1 <= hook.layer < len(layers):
        raise SettingError(f"{type(hook).__name__}: layer={hook.layer} must leave later layers to prune in an LLM of "
                           f"{len(layers)} decoder layers (1 <= layer < {len(layers)})")  # fmt: skip
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    state = _Pruning(hook.layer)

    def capture(module, args, output):
        weights = output[1]  # eager attention: (B, H, Q, S)
        if weights is None or weights.shape[2] == 1 or state.drop is not None:
            return  # a generated token: the prompt's choice stands
        rows = torch.arange(weights.shape[0], device=weights.device)
        batch_spans = spans.expand(weights.shape[0])
        attention = weights[rows, :, batch_spans.query.to(weights.device)].float().mean(dim=1)  # (B, S)
        drop = hook.select(attention, batch_spans).to(weights.device)
        if remove and batch_spans.padding is not None:  # padding leaves the later layers too (it is masked anyway)
            drop = drop | batch_spans.padding.to(weights.device)
        state.choose(drop)

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
        if hidden.shape[1] == 1 or state.drop is not None:
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
            drop = hook.select(attention, batch_spans).to(attention.device)
            if batch_spans.padding is not None:
                drop = drop | batch_spans.padding.to(attention.device)
            state.choose(drop)
        pending.clear()

    first, last = layers[hook.layer], layers[-1]
    handles = [scorer.register_forward_pre_hook(score_before, with_kwargs=True),
               scorer.register_forward_hook(score_after),
               first.register_forward_pre_hook(lambda m, a, k: state.enter(a, k, before), with_kwargs=True),
               last.register_forward_hook(lambda m, a, k, out: state.leave(out), with_kwargs=True)]  # fmt: skip
    handles += [layer.register_forward_pre_hook(state.reuse, with_kwargs=True) for layer in layers[hook.layer + 1 :]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        base.config._attn_implementation = before


def row_attention_possible(attention: nn.Module, cache, index: int) -> bool:
    """Whether the scoring row can be computed from the cache's keys: a transformers attention of the Llama shape
    (q_proj, head_dim, scaling, its module's ``apply_rotary_pos_emb``), a dynamic cache that this prompt fills from
    empty."""
    module = sys.modules.get(type(attention).__module__)
    layers = getattr(cache, "layers", None)
    return (all(hasattr(attention, a) for a in ("q_proj", "head_dim", "scaling", "num_key_value_groups"))
            and hasattr(module, "apply_rotary_pos_emb") and layers is not None and len(layers) > index
            and cache.get_seq_length(index) == 0 and not getattr(attention, "sliding_window", None))  # fmt: skip


def row_attention(attention: nn.Module, hidden: torch.Tensor, position_embeddings, keys: torch.Tensor,
                  spans: VisualSpans) -> torch.Tensor:  # fmt: skip
    """(B, S) head-mean attention probabilities of each row's scoring query over the prompt, as the layer computed
    them (its RoPE'd keys, from the cache, and its query written again for that one position): softmax(q k^T *
    scaling) over the positions the query may see (not later ones, not padding), in fp32, averaged over heads."""
    B, S = hidden.shape[:2]
    rows, at = torch.arange(B, device=hidden.device), spans.query.to(hidden.device)
    q = attention.q_proj(hidden[rows, at][:, None]).view(B, 1, -1, attention.head_dim)
    if getattr(attention, "q_norm", None) is not None:  # Qwen3's per-head norm, before RoPE
        q = attention.q_norm(q)
    q = q.transpose(1, 2)  # (B, H, 1, Dh)
    cos, sin = (t.expand(B, *t.shape[1:])[rows, at][:, None] for t in position_embeddings)
    q, _ = sys.modules[type(attention).__module__].apply_rotary_pos_emb(q, q, cos, sin)
    k = keys.repeat_interleave(attention.num_key_value_groups, dim=1)  # (B, H, S, Dh)
    scores = (q.float() @ k.float().transpose(-1, -2))[:, :, 0] * attention.scaling  # (B, H, S)
    allowed = torch.arange(S, device=hidden.device)[None] <= at[:, None]
    if spans.padding is not None:
        allowed = allowed & ~spans.padding.to(hidden.device)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


def additive_mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """The prompt's attention mask as eager attention takes it (float, 0 = attend, finfo.min = not): from SDPA's
    boolean mask, or from None (SDPA's causal shortcut: a prompt with no padding and no cache)."""
    dtype = hidden.dtype
    if mask is None:
        S = hidden.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=hidden.device).tril()
        return torch.zeros(S, S, dtype=dtype, device=hidden.device).masked_fill(~causal, torch.finfo(dtype).min)[
            None, None
        ]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


class _Pruning:
    """What a hook chose for one forward or one generation, and how the later layers' inputs follow from it."""

    def __init__(self, layer: int):
        self.layer = layer  # the 0-based index of the first layer that runs on the kept positions
        self.drop: torch.Tensor | None = None  # (B, S) True = dropped
        self.index: torch.Tensor | None = None  # (B, S2) the kept positions in order, then padding slots
        self.valid: torch.Tensor | None = None  # (B, S2) False on padding slots
        self.kwargs: dict | None = None  # the later layers' keyword arguments for the current pass
        self.full: torch.Tensor | None = None  # (B, S, D) layer K's input on the prompt, the dropped rows' filler

    def choose(self, drop: torch.Tensor) -> None:
        self.drop = drop
        kept = (~drop).sum(1)
        S2 = int(kept.max())
        self.index = torch.sort(drop.int(), dim=1, stable=True).indices[:, :S2]  # kept positions, ascending
        self.valid = torch.arange(S2, device=drop.device)[None] < kept[:, None]

    # ------------------------------------------------------------------ masking (remove=False)
    def masking(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if self.drop is None or mask is None:
            return None
        S = mask.shape[-1]
        cols = torch.zeros(self.drop.shape[0], S, dtype=torch.bool, device=mask.device)
        cols[:, : min(S, self.drop.shape[1])] = self.drop[:, :S].to(mask.device)
        kwargs["attention_mask"] = mask.masked_fill(cols[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    # ------------------------------------------------------------------ removal
    def enter(self, args, kwargs, implementation: str):
        """Pre-hook of layer K + 1: on the prompt, gather its input and every per-position argument to the kept
        positions; on a generated token, narrow the mask's prompt columns to the kept ones."""
        if self.drop is None:
            return None
        hidden = args[0]
        B, Q = hidden.shape[:2]
        index, valid = self.index, self.valid
        S, S2 = self.drop.shape[1], index.shape[1]
        new = dict(kwargs)
        mask = kwargs.get("attention_mask")
        pad = not bool(valid.all())
        if Q == S:  # the prompt
            self.full = hidden
            hidden = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            cos, sin = kwargs["position_embeddings"]
            take = lambda t: torch.gather(t.expand(B, *t.shape[1:]), 1, index[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
            new["position_embeddings"] = (take(cos), take(sin))
            if kwargs.get("position_ids") is not None:
                new["position_ids"] = torch.gather(kwargs["position_ids"].expand(B, -1), 1, index)
            if kwargs.get("cache_position") is not None:
                new["cache_position"] = torch.arange(S2, device=hidden.device)
            if mask is not None:
                rows = torch.gather(
                    mask.expand(B, -1, -1, -1), 2, index[:, None, :, None].expand(-1, mask.shape[1], -1, S)
                )
                mask = torch.gather(rows, 3, index[:, None, None, :].expand(-1, mask.shape[1], S2, -1))
            elif pad:
                causal = torch.ones(S2, S2, dtype=torch.bool, device=hidden.device).tril()
                mask = causal[None, None].expand(B, 1, S2, S2)
                mask = mask if implementation != "eager" else additive_mask(mask, hidden)
            if mask is not None and pad:  # padding slots: seen by nobody else, each sees itself
                hide = ~valid[:, None, None, :] & ~torch.eye(S2, dtype=torch.bool, device=mask.device)[None, None]
                mask = hide_in(mask, hide)
        else:  # a generated token: the cache holds the kept prompt positions, then the generated ones
            if mask is not None:
                prompt = torch.gather(mask[..., :S].expand(B, -1, -1, -1), 3,
                                      index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))  # fmt: skip
                mask = torch.cat([prompt, mask[..., S:]], dim=-1)
            elif pad:  # SDPA's causal shortcut (no padding in the batch): every cached column but the slots
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                width = cache.get_seq_length(self.layer) + Q
                mask = torch.ones(B, 1, Q, width, dtype=torch.bool, device=hidden.device)
                mask = mask if implementation != "eager" else additive_mask(mask, hidden)
            if mask is not None and pad:
                hide = torch.zeros(mask.shape[0], 1, 1, mask.shape[-1], dtype=torch.bool, device=mask.device)
                hide[..., :S2] = ~valid[:, None, None, :]
                mask = hide_in(mask, hide)
            if kwargs.get("cache_position") is not None:
                new["cache_position"] = kwargs["cache_position"] - (S - S2)
        new["attention_mask"] = mask
        self.kwargs = new
        return (hidden, *args[1:]), new

    def reuse(self, module, args, kwargs):
        if self.drop is None or self.kwargs is None:
            return None
        return args, {**kwargs, **{k: v for k, v in self.kwargs.items() if k != "hidden_states"}}

    def leave(self, output):
        """Forward hook of the last layer: on the prompt, the kept rows back at their positions."""
        if self.drop is None or self.full is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] != self.index.shape[1] or self.full.shape[1] == hidden.shape[1]:
            return None
        full = self.full.to(hidden.dtype).clone()
        rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(self.index)
        full[rows[self.valid], self.index[self.valid]] = hidden[self.valid]
        self.full = None
        return (full, *output[1:]) if isinstance(output, tuple) else full


def hide_in(mask: torch.Tensor, hide: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool: True = attend, or additive float) with the ``hide`` positions made unattendable."""
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)
