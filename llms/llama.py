"""Llama-family backends: ``tinyllama`` (TinyLlama-1.1B-Chat, Zephyr template) and ``vicuna`` (Vicuna v1.5, v1 format).

Both are transformers ``LlamaForCausalLM``; sequences start with BOS as LLaVA's ``tokenizer_image_token`` does.
- tinyllama: the tokenizer's own Zephyr template, ``<|user|>\\n...</s>\\n<|assistant|>\\n...</s>\\n``; the tiny
  preset carries the same template file (llms/templates/tinyllama.jinja), so its generation prompt ends in
  ``<|assistant|>\\n`` as the real one does.
- vicuna: Vicuna checkpoints ship no chat template, so LLaVA's ``conv_vicuna_v1`` is written here:
  ``SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:`` with the standard system line.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from llms import register
from llms.base import LLMBackend

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_TEMPLATE = (
    "{%- if messages[0].role == 'system' -%}{%- set system = messages[0].content -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for m in turns -%}"
    "{%- if m.role == 'user' -%}{{- 'USER: ' + m.content + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + m.content + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
# The chat template TinyLlama-1.1B-Chat-v1.0 ships (Zephyr's, verbatim): the generation prompt is "<|assistant|>\n".
ZEPHYR_TEMPLATE = (Path(__file__).parent / "templates" / "tinyllama.jinja").read_text(encoding="utf-8")
LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


class LlamaBackend(LLMBackend):
    model_cls = LlamaForCausalLM
    config_cls = LlamaConfig
    prepend_bos = True
    tiny_special_tokens = LLAMA_SPECIALS


@register("tinyllama")
class TinyLlamaBackend(LlamaBackend):
    """TinyLlama-1.1B-Chat (LlamaForCausalLM) with its Zephyr-style chat template."""

    chat_template = ZEPHYR_TEMPLATE
    presets = {"tiny": dict(TINY, num_key_value_heads=2)}
    real_checkpoints = ("TinyLlama/TinyLlama-1.1B-Chat-v1.0",)
    geometries = {
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            save_dtype="bfloat16",
        ),
    }


@register("vicuna")
class VicunaBackend(LlamaBackend):
    """Vicuna v1.5 (LlamaForCausalLM) with LLaVA's Vicuna v1 conversation format."""

    chat_template = VICUNA_TEMPLATE
    presets = {"tiny": dict(TINY, num_key_value_heads=4)}
    real_checkpoints = ("lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.5")
    geometries = {  # from the real checkpoints' config.json (stored in fp16)
        name: dict(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=n,
            num_attention_heads=a,
            num_key_value_heads=a,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            save_dtype="float16",
        )
        for name, (h, i, n, a) in {
            "lmsys/vicuna-7b-v1.5": (4096, 11008, 32, 32),
            "lmsys/vicuna-13b-v1.5": (5120, 13824, 40, 40),
        }.items()
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer.chat_template = VICUNA_TEMPLATE  # always the v1 format, whatever the checkpoint ships
