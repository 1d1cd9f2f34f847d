"""LoRA settings (LLaVA-1.5's recipe as the default, names checked) and the QLoRA quantization config."""

from __future__ import annotations

from typing import Any

import torch

LORA_DEFAULTS = {"r": 128, "alpha": 256, "dropout": 0.05, "targets": "all-linear"}  # LLaVA-1.5's LoRA recipe


def normalize_lora(settings: dict[str, Any]) -> dict[str, Any]:
    """LoRA settings with defaults filled in and checked: one line naming a bad setting, its value and the range."""
    unknown = sorted(set(settings) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown LoRA setting(s) {unknown}; known: {', '.join(LORA_DEFAULTS)}")
    out = {**LORA_DEFAULTS, **settings}
    if not isinstance(out["r"], int) or out["r"] < 1:
        raise ValueError(f"LoRA r must be an integer >= 1, got {out['r']!r}")
    if not isinstance(out["alpha"], (int, float)) or out["alpha"] <= 0:
        raise ValueError(f"LoRA alpha must be a number > 0, got {out['alpha']!r}")
    if not isinstance(out["dropout"], (int, float)) or not 0 <= out["dropout"] < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {out['dropout']!r}")
    if not isinstance(out["targets"], str) or not out["targets"]:
        raise ValueError(
            f"LoRA targets must be all-linear or module names joined by + (q_proj+v_proj), got {out['targets']!r}"
        )
    return out


def quantization_config(kind: str):
    """QLoRA's 4-bit NF4 base weights (bitsandbytes), or a clear error where they cannot run."""
    if kind != "nf4":
        raise ValueError(f"quantization must be 'nf4' (QLoRA's 4-bit NormalFloat), got {kind!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            "QLoRA (4-bit base weights through bitsandbytes) needs a CUDA GPU, and this machine has none; "
            "use --lora without --qlora on CPU (bf16 base weights: --backbone-dtype bf16 --precision bf16)"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
