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
    """Per row, the ``(start, end)`` of each run of increasing position ids: a packed sample, or the row's trailing
    padding, whose positions also restart at 0. Increasing ids with gaps stay one sample (FastV's kept positions keep
    their original ids)."""
    out = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] <= row[i - 1]]
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    return out


def cached_segments(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """:func:`segments`, computed once per forward: every layer receives the same position-id tensor, so the spans are
    kept on that tensor itself, keyed by its in-place version and the batch size (another tensor, or this one changed
    in place, is read again)."""
    key = (position_ids._version, batch)
    hit = getattr(position_ids, "_zoo_segments", None)
    if hit is None or hit[0] != key:
        hit = (key, segments(position_ids.expand(batch, -1)))
        position_ids._zoo_segments = hit
    return hit[1]


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature (``query``: ``(B, H, L, D)``; returns ``(B, L, H, D)``, None)."""
    position_ids = kwargs.get("position_ids")
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
    )
    spans = cached_segments(position_ids, query.shape[0]) if packed else None
    if spans is None or all(len(row) == 1 for row in spans):
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
                        dropout_p=p,
                        is_causal=e - s > 1,
                        scale=scaling,
                        **gqa,
                    )
                    for s, e in row
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
