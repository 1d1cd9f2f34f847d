"""``bench plan``: what a configuration and recipe will need per device, before anyone rents GPUs.

Parameter counts are exact: the encoder, connector and LLM are built on the ``meta`` device (no memory, no download)
from the real checkpoint's geometry (the ``geometries`` of each component, or a local / cached ``config.json``). The
rest is arithmetic, stated here so that it can be checked:

- weights: frozen parameters in the backbone dtype, trainable ones in fp32 (master weights);
- gradients: 4 bytes per trainable parameter; optimizer: AdamW's two fp32 moments, 8 bytes per trainable parameter;
- activations of the LLM per sample (SDPA/flash attention, so no s x s matrix is kept), in 2-byte autocast outputs:
  a Llama/Qwen decoder layer keeps its input and norm output (h each), q/k/v (h + 2 h_kv), the attention output
  (h), the post-attention residual and norm (2 h), gate, up, act(gate) and their product (4 i):
  2 s (6 h + 2 h_kv + 4 i) bytes per layer, plus the logits (2 s V for the bf16 logits and 4 s V for the fp32 copy
  the loss takes). With gradient checkpointing a layer keeps only its fp32 input (4 s h) and one layer at a time
  holds the full set during recomputation. The frozen encoder runs under no_grad and keeps nothing;
- FSDP (full shard) divides weights, gradients and optimizer state by the number of devices (plus one unsharded
  decoder layer in flight); DeepSpeed ZeRO-2 divides gradients and optimizer state only;
- FLOPs per sample: 2 x parameters x tokens for each matrix multiply plus 4 s^2 h per attention layer (full, not
  causal-halved); training = forward + backward, where the backward of a frozen part computes input gradients only
  (1 x forward) and of a trained part input and weight gradients (2 x forward); checkpointing adds one LLM forward.

Measured against the CPU real-width runs (tests/test_real_size.py): parameters, gradients and optimizer bytes equal
``results.json``'s memory report exactly; activations and the process peak are estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from connector_zoo.hf import random_geometry
from connector_zoo.model.precision import DTYPES
from connector_zoo.model.tiling import build_tiling
from connectors import build_connector
from encoders import ENCODERS
from encoders.base import EncoderInfo
from llms import LLMS

GB = 1e9


@dataclass
class Counts:
    encoder: int
    connector: int
    llm: int
    llm_embedding: int  # input + output embeddings (counted once when tied)
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int
    visual_tokens: int
    encoder_tokens: int
    lora_per_rank: int  # LoRA parameters per unit of rank over every linear layer but the head
    views: int = 1  # encoder forwards per image: 1, or AnyRes's most (the global view + the largest pinpoint's tiles)


def _geometry(component_cls, checkpoint: str) -> dict[str, Any]:

    random = random_geometry(checkpoint, component_cls.geometries, "num_hidden_layers", 1)
    if random:
        return dict(random[1])
    if checkpoint in component_cls.geometries:
        return dict(component_cls.geometries[checkpoint])
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except OSError as err:
        raise ValueError(
            f"no geometry for {checkpoint!r}: not a known checkpoint ({', '.join(component_cls.geometries)}) and no "
            f"config.json found locally or in the Hugging Face cache ({err})"
        ) from err
    config = getattr(config, "vision_config", config)
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def count(
    enc_name: str,
    enc_ckpt: str,
    conn_spec: dict[str, Any],
    llm_name: str,
    llm_ckpt: str,
    tiling: dict[str, Any] | None = None,
) -> Counts:
    """Exact parameter counts of the composition, built on the meta device; with ``tiling`` (AnyRes) the visual
    tokens and encoder forwards of an image at the largest pinpoint."""

    enc_cls, _ = ENCODERS.resolve(enc_name)
    llm_cls, _ = LLMS.resolve(llm_name)
    if not hasattr(enc_cls, "config_cls"):
        raise ValueError(f"bench plan supports the transformers encoders (clip, siglip), not {enc_name!r}")
    enc_geo = {k: v for k, v in _geometry(enc_cls, enc_ckpt).items() if k != "save_dtype"}
    llm_geo = {k: v for k, v in _geometry(llm_cls, llm_ckpt).items() if k != "save_dtype"}
    with torch.device("meta"):
        enc = enc_cls.model_cls(enc_cls.config_cls(**enc_geo))
        llm = llm_cls.model_cls(llm_cls.config_cls(**llm_geo))
        spec = dict(conn_spec)
        conn = build_connector(spec.pop("name"), enc.config.hidden_size, llm.config.hidden_size, **spec)
    cfg, ecfg = llm.config, enc.config
    side = ecfg.image_size // ecfg.patch_size

    info = EncoderInfo(
        ecfg.hidden_size,
        (side, side),
        ecfg.image_size,
        getattr(enc_cls, "has_cls", True),
        ecfg.num_attention_heads,
        ecfg.num_hidden_layers,
    )
    embeddings = {id(m.weight): m.weight.numel() for m in (llm.get_input_embeddings(), llm.get_output_embeddings())}
    head = llm.get_output_embeddings()
    lora = sum(
        m.in_features + m.out_features for m in llm.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    visual, views = conn.max_tokens(info), 1
    if tiling:
        with torch.device("meta"):
            anyres = build_tiling(tiling, info, conn, cfg.hidden_size)
        visual, views = anyres.max_tokens(conn, info), anyres.geometry.max_views
    return Counts(
        encoder=sum(p.numel() for p in enc.parameters()),
        connector=sum(p.numel() for p in conn.parameters()),
        llm=sum(p.numel() for p in llm.parameters()),
        llm_embedding=sum(embeddings.values()),
        hidden=cfg.hidden_size,
        kv_hidden=cfg.num_key_value_heads * head_dim,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size,
        visual_tokens=visual,
        encoder_tokens=info.num_patches + int(info.has_cls),
        lora_per_rank=lora,
        views=views,
    )


def memory(
    c: Counts,
    stage: int,
    batch: int,
    text_tokens: int,
    backbone: str,
    devices: int = 1,
    checkpointing: bool = False,
    lora_r: int | None = None,
    shard: str = "none",
) -> dict[str, float]:
    """Bytes per device for one stage (see the module docstring for every formula)."""
    half = DTYPES[backbone].itemsize
    trains_llm = stage >= 2
    trainable = c.connector + (c.lora_per_rank * lora_r if trains_llm and lora_r else c.llm if trains_llm else 0)
    frozen = c.encoder + (c.llm if not trains_llm or lora_r else 0)
    weights, grads, optim = frozen * half + trainable * 4, trainable * 4.0, trainable * 8.0
    s = c.visual_tokens + text_tokens
    per_layer = 2 * s * (6 * c.hidden + 2 * c.kv_hidden + 4 * c.intermediate)
    logits = 6 * s * c.vocab
    if checkpointing:
        acts = batch * (c.layers * 4 * s * c.hidden + per_layer + logits)
    else:
        acts = batch * (c.layers * per_layer + logits)
    if shard == "fsdp":
        layer_params = (c.llm - c.llm_embedding) / max(c.layers, 1)
        weights = weights / devices + layer_params * (4 if trains_llm and not lora_r else half)
        grads, optim = grads / devices, optim / devices
    elif shard == "zero2":
        grads, optim = grads / devices, optim / devices
    return {
        "trainable": trainable,
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "activations": acts,
        "total": weights + grads + optim + acts,
    }


def flops_per_sample(c: Counts, stage: int, text_tokens: int, checkpointing: bool, lora: bool) -> dict[str, float]:
    s = c.visual_tokens + text_tokens
    llm_forward = 2 * s * (c.llm - c.llm_embedding + c.vocab * c.hidden) + 4 * c.layers * s * s * c.hidden
    # attention terms of the encoder are small next to its matmuls; each AnyRes view is one encoder forward
    encoder = 2 * c.encoder_tokens * c.encoder * c.views
    connector = 2 * c.encoder_tokens * c.connector * c.views
    backward_llm = llm_forward * (2 if stage >= 2 and not lora else 1)  # frozen / LoRA: input gradients mostly
    train = encoder + 3 * connector + llm_forward + backward_llm + (llm_forward if checkpointing else 0)
    return {"forward": encoder + connector + llm_forward, "train": train}


def fmt_gb(x: float) -> str:
    return f"{x / GB:8.1f}"


def plan_table(
    c: Counts, stage: int, batch: int, text_tokens: int, backbone: str, devices: int, lora_r: int | None
) -> list[str]:
    rows = [
        ("plain (DDP)", dict(checkpointing=False, shard="none")),
        ("+ gradient checkpointing", dict(checkpointing=True, shard="none")),
        (f"+ ZeRO-2 over {devices}", dict(checkpointing=True, shard="zero2")),
        (f"+ FSDP full shard over {devices}", dict(checkpointing=True, shard="fsdp")),
    ]
    lines = [f"  {'per device (GB)':<34}{'weights':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'total':>9}"]
    for label, kw in rows:
        m = memory(c, stage, batch, text_tokens, backbone, devices, lora_r=lora_r, **kw)
        lines.append(
            f"  {label:<34}{fmt_gb(m['weights'])} {fmt_gb(m['gradients'])} {fmt_gb(m['optimizer'])} "
            f"{fmt_gb(m['activations'])} {fmt_gb(m['total'])}"
        )
    return lines


def plan(
    specs: dict[str, dict[str, Any]],
    stages,
    devices: int,
    text_tokens: int,
    backbone: str,
    lora_r: int | None,
    tiling: dict[str, Any] | None = None,
) -> list[str]:
    """The printed plan of every stage of a recipe (``stages``: ``StageConfig`` list); ``tiling``: AnyRes, planned
    at its largest pinpoint (the most tokens an image can take)."""
    enc, llm = specs["encoder"], specs["llm"]
    c = count(enc["name"], enc["checkpoint"], specs["connector"], llm["name"], llm["checkpoint"], tiling)
    s = c.visual_tokens + text_tokens
    tiles = f" (AnyRes at its largest pinpoint: {c.views} views an image)" if tiling else ""
    lines = [
        f"parameters: encoder {c.encoder / 1e6:,.1f} M (frozen), connector {c.connector / 1e6:,.1f} M, "
        f"LLM {c.llm / 1e9:,.3f} B ({c.layers} layers, width {c.hidden}, vocabulary {c.vocab:,})",
        f"sequence: {c.visual_tokens} visual{tiles} + {text_tokens} text = {s} tokens per sample; "
        f"backbone weights {backbone}, trainable fp32, activations bf16",
    ]
    for stage in stages:
        r = (stage.lora or {}).get("r", 128) if stage.lora else lora_r if stage.stage >= 2 else None
        stage.resolve_accumulation(devices)
        m = memory(c, stage.stage, stage.batch_size, text_tokens, backbone, devices, lora_r=r)
        f = flops_per_sample(c, stage.stage, text_tokens, stage.gradient_checkpointing, bool(r))
        what = "connector" if stage.stage < 2 else f"connector + LLM LoRA r={r}" if r else "connector + LLM"
        lines += [
            f"stage {stage.stage} ({what}): trainable {m['trainable'] / 1e6:,.1f} M; batch {stage.batch_size} "
            f"per device x {stage.grad_accum} accumulation x {devices} devices = "
            f"{stage.batch_size * stage.grad_accum * devices}; gradient checkpointing "
            f"{'on' if stage.gradient_checkpointing else 'off'} in the recipe",
            *plan_table(c, stage.stage, stage.batch_size, text_tokens, backbone, devices, r),
            f"  FLOPs per sample: forward {f['forward'] / 1e12:.2f} TFLOP, training step {f['train'] / 1e12:.2f} TFLOP",
        ]
    return lines
