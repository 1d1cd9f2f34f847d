"""Taking FastV's dropped positions out of the later decoder layers (``llms/hooks.py`` decides and drives it):
the scoring row computed from the cache's keys, the eager mask of the scoring layer, and ``_Pruning``, which gathers
the later layers' inputs to the kept positions, narrows their masks at every generated token, and puts the kept rows
back in place after the last layer."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from llms.hooks import VisualSpans


def row_attention_possible(attention: nn.Module, cache, index: int) -> bool:
    """Whether the scoring row can be computed from the cache's keys: a transformers attention of the Llama shape
    (q_proj, head_dim, scaling, its module's ``apply_rotary_pos_emb``), a dynamic cache that this prompt fills from
    empty."""
    module = sys.modules.get(type(attention).__module__)
    layers = getattr(cache, "layers", None)
    return (
        all(hasattr(attention, a) for a in ("q_proj", "head_dim", "scaling", "num_key_value_groups"))
        and hasattr(module, "apply_rotary_pos_emb")
        and layers is not None
        and len(layers) > index
        and cache.get_seq_length(index) == 0
        and not getattr(attention, "sliding_window", None)
    )


def row_attention(
    attention: nn.Module, hidden: torch.Tensor, position_embeddings, keys: torch.Tensor, spans: VisualSpans
) -> torch.Tensor:
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
        self.decided = False  # the hook chose (perhaps to drop nothing: then ``drop`` stays None)

    def choose(self, drop: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        """``drop`` (B, S): the positions the hook drops; ``padding``: the batch's padding, which leaves the later
        layers with them (it is masked anyway). Dropping nothing leaves every layer as it is: padding alone is not
        removed, so a hook that keeps every image token computes exactly what the model does without it."""
        if not drop.any():
            self.decided = True
            return
        if padding is not None:
            drop = drop | padding.to(drop.device)
        self.drop, self.decided = drop, True
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
                prompt = torch.gather(
                    mask[..., :S].expand(B, -1, -1, -1),
                    3,
                    index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1),
                )
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
        if hidden.shape[1] != self.index.shape[1]:
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
