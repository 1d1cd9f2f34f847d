"""``bench export-hf``: the exported LlavaForConditionalGeneration computes what this project computes.

transformers' Llava is an independent implementation of the same semantics (layer choice, CLS drop, the projector,
the splice position), so equal logits and equal greedy tokens pin all of them down.
"""

from __future__ import annotations

import pytest
import torch
from conftest import images
from transformers import AutoProcessor, LlavaForConditionalGeneration

from bench.cli import main
from connector_zoo.model.llava import ExportError, export_hf
from connector_zoo.model.vlm import VLM, VLMInputs

PROMPT = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]


@pytest.mark.parametrize(
    "encoder,llm,connector",
    [
        ("clip", "vicuna", "mlp2x_gelu"),
        ("clip", "qwen3", "mlp2x_gelu"),
        ("siglip", "tinyllama", "mlp2x_gelu"),
        ("siglip", "qwen3", "mlp2x_gelu"),
        ("clip", "vicuna", "linear"),  # Llava's projector with an identity activation and second layer
    ],
)
def test_exported_llava_matches_logits_and_greedy_tokens(tmp_path, encoder, llm, connector):
    torch.manual_seed(0)
    vlm = VLM.build({"name": encoder}, {"name": connector}, {"name": llm}).eval()
    with torch.no_grad():
        for p in vlm.connector.parameters():
            p.normal_(0, 0.3)  # a non-trivial projector
    export_hf(vlm, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")

    img = images(1)[0]
    ids = torch.tensor(vlm.llm.encode_prompt(PROMPT))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}],
        add_generation_prompt=True,
        **vlm.llm.generation_template_kwargs,
    )
    hf_inputs = processor(text=text, images=[img], return_tensors="pt")
    # the processor expands <image> to exactly as many tokens as the connector emits, at the same place
    n_vis = vlm.encoder.info.num_patches
    p = int((ids == vlm.llm.image_token_id).nonzero())
    expected = torch.cat([ids[:p], torch.full((n_vis,), vlm.llm.image_token_id), ids[p + 1 :]])
    assert hf_inputs["input_ids"][0].tolist() == expected.tolist()

    ours_inputs = VLMInputs([ids], pixel_values=hf_inputs["pixel_values"], has_image=[True])
    with torch.no_grad():
        ours = vlm(ours_inputs).logits
        theirs = hf(**hf_inputs).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    ours_tokens = vlm.generate_ids(ours_inputs, max_new_tokens=8)
    theirs_tokens = hf.generate(**hf_inputs, max_new_tokens=8, do_sample=False)[:, expected.shape[0] :]
    assert ours_tokens.tolist() == theirs_tokens.tolist()


def test_other_connectors_are_refused_with_a_reason(tmp_path, capsys):
    assert main(["export-hf", "--connector", "qformer", "--out", str(tmp_path / "x")]) == 2
    assert "always Linear-activation-Linear" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    vlm = VLM.build({"name": "eva-vit-g"}, {"name": "mlp2x_gelu"}, {"name": "vicuna"})
    with pytest.raises(ExportError, match="transformers vision tower"):
        export_hf(vlm, tmp_path / "y")
