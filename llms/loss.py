"""The causal-LM loss with the LM head applied only where a label is, not to every position.

A VLM's training sequence is mostly visual tokens and prompt, and its labels sit on the answer: a full ``(B, L, V)``
logits tensor computes (and keeps for the backward) ``L`` rows of the vocabulary head where a handful are read. At a
49,152-token vocabulary and 64 visual tokens that head costs more than a few decoder layers. The loss here is
transformers' own (``ForCausalLMLoss``: labels shifted by one, fp32 logits, cross-entropy averaged over the labelled
tokens), computed on the decoder's hidden states at the labelled positions only; ``tests/test_label_logits.py`` pins it
to the full-logits loss and gradients. Models whose head is more than a linear map (logit soft-capping, a logit
scale) take the full path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def head_only_at_labels(model) -> bool:
    """Whether ``model``'s logits are its output embedding of the decoder's last hidden state, nothing more."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, k, None) not in (None, 1, 1.0) for k in _HEAD_EXTRAS):
        return False
    return model.get_output_embeddings() is not None and model.get_decoder() is not None


def causal_lm_forward(model, labels: torch.Tensor | None = None, full_logits: bool = False, **inputs):
    """``model(**inputs, labels=labels)`` as (loss, logits). With labels and not ``full_logits``, the logits are only
    the labelled positions' rows ``(n_labelled, V)``, in the order of ``labels[:, 1:] != -100``."""
    if labels is None or full_logits or not head_only_at_labels(model):
        out = model(**inputs, labels=labels)
        return out.loss, out.logits
    hidden = model.get_decoder()(**inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep]), logits
