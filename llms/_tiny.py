"""Tiny byte-level BPE tokenizers for the random tiny presets, built offline with ``tokenizers``."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# A fixed little corpus so the default tiny tokenizers are deterministic; the mini world passes its own text.
DEFAULT_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What colour is the circle? ASSISTANT: The circle is red.",
    "Describe the image briefly. There is a small blue square above a large green triangle.",
    "How many objects are there? Three. Is there a yellow circle? Yes. Is the cube left of the ball? No.",
    "user assistant system image picture photo shape colour color red green blue yellow purple orange cyan",
    "circle square triangle small large left right above below top bottom middle center one two three four",
] * 4


def build_tiny_tokenizer(
    corpus: list[str] | None, special: dict[str, Any], chat_template: str, vocab_size: int = 384
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (encodes any text) with the given special tokens and chat template."""
    roles = {k: v for k, v in special.items() if k != "additional"}
    extra = list(special.get("additional", []))
    specials = list(dict.fromkeys([*roles.values(), *extra]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer)
    bos = roles.get("bos_token")
    if bos:  # like real Llama tokenizers, ``tokenizer(text)`` starts with BOS (the Llava processor relies on it)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=chat_template,
        additional_special_tokens=extra,
        clean_up_tokenization_spaces=False,
        **roles,
    )
