"""Attention over packed rows without the padding or the dense mask: each sample of a row attends to itself only.

A packed training row holds several samples end to end, their position ids restarting at 0 for each
(``connector_zoo.model.vlm.VLM._pack``). transformers' ``sdpa`` reads those position ids and builds a dense
block-diagonal mask of ``L x L`` for the row; PyTorch's scaled-dot-product attention then computes every entry of it,
so a row of 16 samples of 900 tokens computes (and keeps for the backward) 16 times the attention it needs. This is
flash-attention's variable-length attention done the plain way: the row is cut where its position ids restart and
each piece is one causal ``scaled_dot_product_attention`` call, so a row of any number of samples costs the sum of
its samples' attention, and one row can hold a whole micro-batch with no padding at all.

It is registered with transformers as ``zoo_sdpa_varlen`` (an attention function and its mask function) and every
LLM backend that loads with ``sdpa`` uses it instead (``use_varlen``). Anything that is not a packed row (a padded
batch with its 2-D mask, generation with a cache, one sample per row) goes to transformers' own ``sdpa`` function
unchanged, with the mask transformers builds for it, so the only path that differs is the packed one.
``tests/test_packing.py`` pins it to transformers' sdpa with the dense block-diagonal mask, values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "zoo_sdpa_varlen"
#: attention implementations that attend within each packed sample at no cost beyond it (flash-attention's varlen
#: kernels read the same restarting position ids)
VARLEN_IMPLEMENTATIONS = (VARLEN, "flash_attention_2", "flash_attention_3")


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of each packed sample: a run that begins where the position ids restart at 0 (a
    sample, or the row's trailing padding, whose positions also restart at 0). Increasing ids with gaps stay one sample
    (FastV's kept positions keep their original ids); so does a restart at r > 0: a *branch* of the sample
    (:func:`branch_mask`)."""
    out = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] <= row[i - 1] and row[i] == 0]
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    return out


def branch_mask(positions: torch.Tensor) -> torch.Tensor | None:
    """A sample's ``(L, L)`` boolean attention mask when its position ids restart at r > 0 (``LLMBackend.
    encode_branches``: one opening, then branches, each numbered on from the opening as if it followed it alone), else
    None (plain causal). A token of the first branch attends causally, as usual; a token of a later branch whose ids
    restart at r attends to the opening's tokens (ids below r, before the first restart) and, causally, to its own
    branch, never to another branch: each branch computes what it would alone after the opening."""
    L = positions.shape[0]
    if L < 2:
        return None
    restart = torch.zeros(L, dtype=torch.bool, device=positions.device)
    restart[1:] = positions[1:] <= positions[:-1]
    if not bool(restart.any()):
        return None
    branch = restart.long().cumsum(0)  # 0: the opening and the first branch, k: the k-th restart's branch
    idx = torch.arange(L, device=positions.device)
    opening = idx < int(restart.nonzero()[0])
    starts = torch.zeros(int(branch.max()) + 1, dtype=positions.dtype, device=positions.device)
    starts[branch[restart]] = positions[restart]
    start_of = starts[branch]  # per token: the id its branch restarted at (0 for branch 0)
    causal = idx[None, :] <= idx[:, None]
    same = branch[None, :] == branch[:, None]
    shared = opening[None, :] & (positions[None, :] < start_of[:, None]) & (branch[:, None] > 0)
    return (causal & same) | shared


def cached_segments(
    position_ids: torch.Tensor, batch: int
) -> tuple[list[list[tuple[int, int]]], list[list[torch.Tensor | None]]]:
    """:func:`segments`, and per segment its :func:`branch_mask` (None for a sample without branches), computed once
    per forward: every layer receives the same position-id tensor, so they are kept on that tensor itself, keyed by
    its in-place version and the batch size (another tensor, or this one changed in place, is read again)."""
    key = (position_ids._version, batch)
    hit = getattr(position_ids, "_zoo_segments", None)
    if hit is None or hit[0] != key:
        rows = position_ids.expand(batch, -1)
        spans = segments(rows)
        hit = (key, spans, [[branch_mask(rows[b, s:e]) for s, e in row] for b, row in enumerate(spans)])
        position_ids._zoo_segments = hit
    return hit[1], hit[2]


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature (``query``: ``(B, H, L, D)``; returns ``(B, L, H, D)``, None)."""
    position_ids = kwargs.get("position_ids")
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
    )
    spans, masks = cached_segments(position_ids, query.shape[0]) if packed else (None, None)
    if spans is None or all(len(row) == 1 and row_masks[0] is None for row, row_masks in zip(spans, masks)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    p = dropout if module.training else 0.0
    rows = []
    for b, row in enumerate(spans):
        rows.append(
            torch.cat(
                [
                    F.scaled_dot_product_attention(
                        query[b : b + 1, :, s:e],
                        key[b : b + 1, :, s:e],
                        value[b : b + 1, :, s:e],
                        attn_mask=masks[b][j],
                        dropout_p=p,
                        is_causal=masks[b][j] is None and e - s > 1,
                        scale=scaling,
                        **gqa,
                    )
                    for j, (s, e) in enumerate(row)
                ],
                dim=2,
            )
        )
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def varlen_mask(*args, **kwargs):
    """No mask for a row without padding and without a cache (the attention cuts packed rows itself); transformers'
    sdpa mask otherwise."""
    q_length = kwargs.get("q_length")
    if (
        not args
        and kwargs.get("attention_mask") is None
        and q_length is not None
        and q_length == kwargs.get("kv_length")
        and not kwargs.get("q_offset")
        and kwargs.get("local_size") is None  # (a sliding window's mask is built as transformers builds it)
    ):
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(VARLEN, varlen_sdpa_forward)
AttentionMaskInterface.register(VARLEN, varlen_mask)


def use_varlen(model) -> None:
    """Switch a transformers model loaded with ``sdpa`` to :data:`VARLEN` (same results on every unpacked input)."""
    config = model.config
    sliding = getattr(config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    )
    if getattr(config, "_attn_implementation", None) == "sdpa" and not sliding:  # (windows: not cut per sample here)
        model.set_attn_implementation(VARLEN)
