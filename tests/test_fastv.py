"""FastV through the LLM backend's visual-token hook, against FastV's own in-place algorithm written out."""

from __future__ import annotations

import pytest
import torch
from conftest import LLM_NAMES, images

from bench.model.vlm import VLM, VLMInputs
from connectors import build_connector
from llms.base import IGNORE_INDEX


def fastv_vlm(encoders, llms, llm_name: str, **settings) -> VLM:
    enc, llm = encoders["clip"], llms[llm_name]
    torch.manual_seed(0)
    return VLM(enc, build_connector("fastv", enc.info.hidden_size, llm.hidden_size, **settings), llm).eval()


def prompt(vlm: VLM, text: str = "What colour is the circle?") -> VLMInputs:
    ids = vlm.prompt_ids([True], [text])
    return VLMInputs(ids, pixel_values=vlm.encoder.preprocess(images(1)), has_image=[True])


@pytest.mark.parametrize("llm_name", LLM_NAMES)
def test_fastv_equals_the_in_place_algorithm(encoders, llms, llm_name):
    """modeling_llama.py's fastv_forward (inplace): run K layers on everything; rank the image tokens by the head-mean
    attention of the last position in layer K; keep round(n (1 - R)), keep positions; run the remaining layers on the
    kept sequence only. Our masked version must give the same logits at every kept position."""
    K, R = 1, 0.5
    vlm = fastv_vlm(encoders, llms, llm_name, k=K, r=R)
    inputs = prompt(vlm)
    with torch.no_grad():
        visual = vlm.visual_tokens(inputs)
        embeds, _, _, _ = vlm.splice(inputs, visual)
        ours = vlm(inputs).logits[0]
        model, base = vlm.llm.model, vlm.llm.model.model
        before = model.config._attn_implementation
        model.set_attn_implementation("eager")
        full = model(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True)
        model.set_attn_implementation(before)
        s, n = int((inputs.input_ids[0] == vlm.llm.image_token_id).nonzero()[0]), visual.tokens.shape[1]
        L = embeds.shape[1]
        last_row = full.attentions[K - 1][0].mean(0)[-1]
        kept_image = (last_row[s : s + n].topk(round(n * (1 - R))).indices + s).tolist()
        keep = sorted(list(range(s)) + kept_image + list(range(s + n, L)))
        h = full.hidden_states[K][:, keep]
        position_ids = torch.tensor(keep)[None]
        position_embeddings = base.rotary_emb(h, position_ids)
        causal = torch.full((len(keep), len(keep)), torch.finfo(h.dtype).min).triu(1)[None, None]
        for layer in base.layers[K:]:
            h = layer(h, attention_mask=causal, position_embeddings=position_embeddings, position_ids=position_ids)
        reference = model.lm_head(base.norm(h))[0]
    assert len(keep) == L - n // 2
    torch.testing.assert_close(ours[keep], reference, rtol=1e-4, atol=1e-5)
    # and the pruning mattered: the plain model's logits differ
    with torch.no_grad():
        plain = model(inputs_embeds=embeds).logits[0]
    assert (plain[-1] - ours[-1]).abs().max() > 1e-4


def test_fastv_dropping_nothing_is_the_plain_model(encoders, llms):
    vlm = fastv_vlm(encoders, llms, "qwen3", k=1, r=0.0)
    inputs = prompt(vlm)
    with torch.no_grad():
        visual = vlm.visual_tokens(inputs)
        embeds, mask, _, position_ids = vlm.splice(inputs, visual)
        plain = vlm.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(vlm(inputs).logits, plain, rtol=1e-4, atol=1e-5)
    assert vlm.llm.model.config._attn_implementation != "eager" or plain is not None  # restored after the call


def test_fastv_generation_with_the_cache_equals_teacher_forcing(encoders, llms):
    """Generated tokens see the prompt's pruning through the KV cache: each step's logits equal the teacher-forced
    forward's (labels on the generated tokens put the scoring query at the last prompt token, as in generation)."""
    vlm = fastv_vlm(encoders, llms, "tinyllama", k=1, r=0.75)
    inputs = prompt(vlm)
    with torch.no_grad():
        gen = vlm.generate_ids(inputs, max_new_tokens=4, output_logits=True, return_dict_in_generate=True,
                               min_new_tokens=4)  # fmt: skip
        new = gen.sequences[0]
        ids = torch.cat([inputs.input_ids[0], new])
        labels = torch.cat([torch.full_like(inputs.input_ids[0], IGNORE_INDEX), new])
        forced = vlm(VLMInputs([ids], [labels], inputs.pixel_values, has_image=[True])).logits[0]
    n = len(new)
    steps = torch.stack([step[0] for step in gen.logits])  # (n, V)
    torch.testing.assert_close(steps, forced[-n - 1 : -1], rtol=1e-4, atol=1e-5)


def test_fastv_needs_a_later_layer(encoders, llms):
    vlm = fastv_vlm(encoders, llms, "qwen3", k=2)  # the tiny LLM has 2 layers: nothing after layer 2
    with pytest.raises(ValueError, match="must leave later layers"):
        vlm(prompt(vlm))
