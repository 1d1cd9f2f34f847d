"""``qwen3``: transformers ``Qwen3ForCausalLM`` (reference notes: ``Qwen/Qwen3-4B``; also -0.6B, -1.7B).

ChatML from the tokenizer's own template (``<|im_start|>role\\n...<|im_end|>``); the end of an assistant turn is
``<|im_end|>``. Generation prompts are rendered with ``enable_thinking=False`` (Qwen3's non-thinking mode, the prompt
ends in an empty ``<think></think>`` block), the mode the visual instruction data trains. Tiny presets carry the
template Qwen3 ships (llms/templates/qwen3.jinja), so the labels a tiny run trains are the ones a real Qwen3 run
trains (tests/test_real_tokenizers.py checks both with Qwen's real BPE).
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen3Config, Qwen3ForCausalLM

from llms import register
from llms.base import LLMBackend

# The chat template Qwen3 ships (tokenizer_config.json of Qwen/Qwen3-0.6B .. -4B, verbatim): system message, tools,
# reasoning kept only after the last user turn, ``enable_thinking``. Tiny presets use it, so they write the real format.
QWEN3_TEMPLATE = (Path(__file__).parent / "templates" / "qwen3.jinja").read_text(encoding="utf-8")


@register("qwen3")
class Qwen3Backend(LLMBackend):
    """Qwen3 causal LM (Qwen3ForCausalLM) with its ChatML template; non-thinking generation prompts."""

    model_cls = Qwen3ForCausalLM
    config_cls = Qwen3Config
    chat_template = QWEN3_TEMPLATE
    generation_template_kwargs = {"enable_thinking": False}
    tiny_special_tokens = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
    }
    presets = {
        "tiny": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        ),
    }
    real_checkpoints = ("Qwen/Qwen3-4B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-0.6B")
    geometries = {  # from the real checkpoints' config.json
        name: dict(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=n,
            num_attention_heads=a,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            save_dtype="bfloat16",
        )
        for name, (h, i, n, a) in {
            "Qwen/Qwen3-4B": (2560, 9728, 36, 32),
            "Qwen/Qwen3-1.7B": (2048, 6144, 28, 16),
            "Qwen/Qwen3-0.6B": (1024, 3072, 28, 16),
        }.items()
    }

    @property
    def end_of_turn(self) -> str:
        return "<|im_end|>"
