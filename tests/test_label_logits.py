"""The LM head only at labelled positions (llms/loss.py): the same loss and gradients as transformers' full-logits
loss, on a right-padded batch mixing image and text-only rows, for each backend, and under LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import CONV_A, CONV_B, CONV_TEXT, batch, images

from connector_zoo.model.vlm import VLM
from connectors import build_connector
from llms import build_llm
from llms.loss import causal_lm_forward, head_only_at_labels


def vlm_for(encoders, llm) -> VLM:
    torch.manual_seed(0)
    enc = encoders["clip"]
    return VLM(enc, build_connector("mlp2x_gelu", enc.info.hidden_size, llm.hidden_size), llm)


def losses_and_grads(vlm: VLM, inputs, full: bool):
    vlm.zero_grad(set_to_none=True)
    out = vlm(inputs, full_logits=full)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("llm_name", ["tinyllama", "qwen3"])
def test_label_only_head_equals_the_full_logits_loss(encoders, llms, llm_name):
    llm = llms[llm_name]
    vlm = vlm_for(encoders, llm)
    px = vlm.encoder.preprocess(images(2))
    inputs = batch(llm, [CONV_A, CONV_TEXT, CONV_B], [True, False, True], px)
    llm.model.requires_grad_(True)
    try:
        fast, fast_grads = losses_and_grads(vlm, inputs, full=False)
        full, full_grads = losses_and_grads(vlm, inputs, full=True)
    finally:  # the LLM is the session's shared one: leave it as it was found (frozen, no gradients)
        llm.model.requires_grad_(False)
        vlm.zero_grad(set_to_none=True)
    # the reference: transformers' own loss from the full logits
    _, _, labels, _ = vlm.splice(inputs, vlm.visual_tokens(inputs))
    n = int((labels[:, 1:] != -100).sum())
    assert full.logits.dim() == 3 and fast.logits.shape == (n, full.logits.shape[-1])
    want = full.logits[:, :-1][labels[:, 1:] != -100]
    torch.testing.assert_close(fast.logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert set(fast_grads) == set(full_grads) and any(k.startswith("llm.") for k in fast_grads)
    for name, g in full_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_label_only_head_under_lora(encoders):
    from peft import LoraConfig, get_peft_model

    llm = build_llm("tinyllama")
    llm.model = get_peft_model(llm.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert head_only_at_labels(llm.model)
    vlm = vlm_for(encoders, llm)
    inputs = batch(llm, [CONV_A, CONV_TEXT], [True, False], vlm.encoder.preprocess(images(1)))
    fast, fast_grads = losses_and_grads(vlm, inputs, full=False)
    full, full_grads = losses_and_grads(vlm, inputs, full=True)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert any("lora_" in k for k in fast_grads)
    for name, g in full_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_a_head_with_a_logit_scale_takes_the_full_path(llms):
    model = llms["tinyllama"].model
    ids = torch.tensor([[1, 5, 6, 7]])
    labels = torch.tensor([[-100, -100, 6, 7]])
    model.config.logit_scale = 0.5  # e.g. Cohere: logits = head(h) * scale; the label-only path would skip it
    try:
        assert not head_only_at_labels(model)
        loss, logits = causal_lm_forward(model, labels, input_ids=ids)
    finally:
        del model.config.logit_scale
    assert logits.dim() == 3 and torch.isclose(loss, model(input_ids=ids, labels=labels).loss)
