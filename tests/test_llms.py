"""LLM backends: chat templates, exactly-the-assistant-tokens labels on multi-turn conversations, loading by path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LLM_NAMES, THREE_TURNS, install_in_hf_cache

from llms import build_llm
from llms.base import IGNORE_INDEX, TemplateError

CONVERSATION = THREE_TURNS

# What each backend's template must produce (written out by hand from the formats in SPECS.md)
EXPECTED_TEXT = {
    "qwen3": "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
    "<|im_start|>user\nHow many squares are there?<|im_end|>\n<|im_start|>assistant\nTwo small squares.<|im_end|>\n"
    "<|im_start|>user\nIs the triangle above the circle?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    "Yes.<|im_end|>\n",
    "tinyllama": "<|user|>\n<image>\nWhat colour is the circle?</s>\n<|assistant|>\nRed.</s>\n"
    "<|user|>\nHow many squares are there?</s>\n<|assistant|>\nTwo small squares.</s>\n"
    "<|user|>\nIs the triangle above the circle?</s>\n<|assistant|>\nYes.</s>\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat colour is the circle? "
    "ASSISTANT: Red.</s>"
    "USER: How many squares are there? ASSISTANT: Two small squares.</s>"
    "USER: Is the triangle above the circle? ASSISTANT: Yes.</s>",
}
# The labelled text of each assistant turn: what the model generates after the generation prompt, through end of turn
EXPECTED_LABELLED = {
    "qwen3": ["Red.<|im_end|>", "Two small squares.<|im_end|>", "<think>\n\n</think>\n\nYes.<|im_end|>"],
    "tinyllama": ["Red.</s>", "Two small squares.</s>", "Yes.</s>"],  # the prompt ends in "<|assistant|>\n"
    "vicuna": [" Red.</s>", " Two small squares.</s>", " Yes.</s>"],
}


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i  # labels are not shifted by hand
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", LLM_NAMES)
def test_template_renders_the_published_format(llms, name):
    assert llms[name].render(CONVERSATION) == EXPECTED_TEXT[name]


@pytest.mark.parametrize("name", LLM_NAMES)
def test_labels_cover_exactly_the_assistant_turns(llms, name):
    llm = llms[name]
    enc = llm.encode_conversation(CONVERSATION)
    runs = labelled_runs(enc.input_ids, enc.labels)
    decoded = [llm.tokenizer.decode(run) for run in runs]
    assert decoded == EXPECTED_LABELLED[name]
    eot = llm.tokenizer.convert_tokens_to_ids(llm.end_of_turn)
    assert all(run[-1] == eot for run in runs)
    # everything else is ignored, and the whole sequence is the rendered text
    n_labelled = sum(len(r) for r in runs)
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == n_labelled
    bos = [llm.tokenizer.bos_token_id] if llm.prepend_bos else []
    assert enc.input_ids == bos + llm.tokenizer(EXPECTED_TEXT[name], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", LLM_NAMES)
def test_image_token_is_one_special_token(llms, name):
    llm = llms[name]
    ids = llm.encode_conversation(CONVERSATION).input_ids
    assert ids.count(llm.image_token_id) == 1
    assert llm.tokenizer.convert_ids_to_tokens(llm.image_token_id) == "<image>"
    assert llm.model.get_input_embeddings().weight.shape[0] >= len(llm.tokenizer)
    assert llm.pad_token_id is not None


@pytest.mark.parametrize("name", LLM_NAMES)
def test_generation_prompt_ends_where_labels_begin(llms, name):
    llm = llms[name]
    prompt = llm.encode_prompt(CONVERSATION[:1])
    full = llm.encode_conversation(CONVERSATION[:2])
    first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    if name == "qwen3":  # non-thinking prompt: the empty think block is part of the prompt
        assert llm.tokenizer.decode(prompt).endswith("<think>\n\n</think>\n\n")
    else:
        assert prompt == full.input_ids[:first_label]


@pytest.mark.parametrize("name", LLM_NAMES)
def test_loads_by_hub_id_from_an_existing_hf_cache(llms, name, tmp_path, monkeypatch):
    """The tiny preset, put in a Hugging Face cache under a hub id, loads by that id with HF_HUB_OFFLINE=1; its logits
    equal those of transformers' AutoModelForCausalLM reading the files itself (after the <image> row is added)."""
    from transformers import AutoModelForCausalLM

    llm = llms[name]
    hub_id = f"connector-zoo-tests/{name}-tiny"
    install_in_hf_cache(Path(llm.model.name_or_path), hub_id, tmp_path / "hub", monkeypatch)
    again = build_llm(name, checkpoint=hub_id)
    assert len(again.tokenizer) == len(llm.tokenizer) and again.image_token_id == llm.image_token_id
    ids = torch.tensor([[i for i in llm.encode_conversation(CONVERSATION).input_ids if i != llm.image_token_id]])
    reference = AutoModelForCausalLM.from_pretrained(Path(llm.model.name_or_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again.model(ids).logits[..., : reference.config.vocab_size], reference(ids).logits, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": "only"}],
        [{"role": "user", "content": None}],
    ],
)
def test_malformed_conversations_are_rejected(llms, bad):
    with pytest.raises(TemplateError):
        llms["vicuna"].encode_conversation(bad)
