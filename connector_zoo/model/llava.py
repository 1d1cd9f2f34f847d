"""Export to transformers' ``LlavaForConditionalGeneration`` (the format transformers and serving engines load), or
``LlavaNextForConditionalGeneration`` for a model that tiles its images (AnyRes).

Only a ``clip``/``siglip`` encoder + an ``mlp2x_gelu`` or ``linear`` connector + a Llama-family or Qwen3 LLM maps onto
them: Llava's projector is always Linear -> activation -> Linear, so ``mlp2x_gelu`` is it with GELU, and ``linear``
is it with the identity activation (``projector_hidden_act="linear"``) and an identity second layer (exact: a product
by 1 and sums of zeros). The layer choice maps to ``vision_feature_layer``; dropping CLS maps to
``vision_feature_select_strategy="default"`` (CLIP with ``feature_select="patch"``), keeping every token to ``"full"``
(SigLIP, or CLIP with ``cls_patch``). The processor's chat template wraps the LLM's own template so that it accepts
transformers' content lists (``{"type": "image"}`` becomes ``<image>\\n``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)

from connector_zoo.io import atomic_path
from connector_zoo.model.vlm import ADAPTER_DIR, VLM
from connectors.linear import LinearConnector
from connectors.mlp import MLPConnector
from encoders._hf import HFVisionEncoder

# Turn content lists into strings, then hand over to the LLM's own template (which reads ``messages``).
CONTENT_LIST_PREAMBLE = (
    "{%- set ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m.content is string -%}{%- set text = m.content -%}"
    "{%- else -%}{%- set parts = namespace(t='') -%}"
    "{%- for item in m.content -%}"
    "{%- if item.type == 'image' -%}{%- set parts.t = parts.t + '<image>\\n' -%}"
    "{%- elif item.type == 'text' -%}{%- set parts.t = parts.t + item.text -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = parts.t -%}{%- endif -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m.role, 'content': text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)


class ExportError(ValueError):
    """The model cannot be expressed as a transformers Llava model."""


def check_exportable(vlm: VLM) -> None:
    if not isinstance(vlm.encoder, HFVisionEncoder):
        raise ExportError(
            f"export-hf needs a transformers vision tower (clip or siglip); encoder {vlm.encoder.registered_name!r} "
            "is not one"
        )
    conn = vlm.connector
    if not ((isinstance(conn, MLPConnector) and conn.depth == 2) or isinstance(conn, LinearConnector)):
        raise ExportError(
            f"export-hf writes LlavaForConditionalGeneration, whose projector is always Linear-activation-Linear "
            f"(mlp2x_gelu, or linear with an identity activation and second layer); connector "
            f"{conn.spec.get('name', conn.registered_name)!r} cannot be expressed in it. "
            "Keep this project's own run directory for other connectors."
        )
    if vlm.tiling is not None and conn.output_grid(*vlm.encoder.info.grid) is None:
        raise ExportError(
            "export-hf of an AnyRes model writes LlavaNextForConditionalGeneration, which lays the patches out as a "
            "grid: the connector must take the patch tokens only (feature_select='patch')"
        )
    if vlm.llm.model.config.model_type not in ("llama", "qwen3"):
        raise ExportError(f"export-hf supports Llama-family and Qwen3 LLMs, not {vlm.llm.model.config.model_type!r}")


def feature_strategy(vlm: VLM) -> str:
    drops_cls = vlm.encoder.info.has_cls and vlm.connector.feature_select == "patch"
    return "default" if drops_cls else "full"


def to_llava(vlm: VLM, merge: bool = True):
    """Build the Llava model and processor holding exactly this model's weights (``LlavaNext*`` for an AnyRes
    model). LoRA adapters are merged into the LLM first, or with ``merge=False`` left out (the base weights as they
    are; :func:`llava_adapter` writes the adapters): ``vlm``'s LLM is a plain causal LM afterwards either way."""
    check_exportable(vlm)
    if merge:
        vlm.llm.merge_lora()
    else:
        vlm.llm.unload_lora()
    enc, llm = vlm.encoder, vlm.llm
    strategy = feature_strategy(vlm)
    common = dict(
        vision_config=enc.model.config.to_dict(),
        text_config=llm.model.config.to_dict(),
        image_token_index=llm.image_token_id,
        projector_hidden_act="gelu" if isinstance(vlm.connector, MLPConnector) else "linear",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=enc.layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(llm.model.config.tie_word_embeddings),
    )
    processor_args = dict(
        tokenizer=llm.tokenizer,
        patch_size=enc.model.config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if enc.info.has_cls else 0,
        image_token="<image>",
        chat_template=CONTENT_LIST_PREAMBLE + llm.tokenizer.chat_template,
    )
    if vlm.tiling is None:
        n_tokens = enc.info.num_patches + (1 if strategy == "full" and enc.info.has_cls else 0)
        hf = LlavaForConditionalGeneration(LlavaConfig(image_seq_length=n_tokens, **common)).eval()
        processor = LlavaProcessor(image_processor=enc.processor, **processor_args)
    else:
        pinpoints = [list(p) for p in vlm.tiling.geometry.pinpoints]
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, image_seq_length=enc.info.num_patches, **common)
        hf = LlavaNextForConditionalGeneration(config).eval()
        with torch.no_grad():
            hf.model.image_newline.copy_(vlm.tiling.image_newline)
        processor = LlavaNextProcessor(image_processor=llava_next_image_processor(vlm), **processor_args)
    hf.model.vision_tower.load_state_dict(enc.model.state_dict())
    hf.model.language_model.load_state_dict(llm.model.model.state_dict())
    hf.lm_head.load_state_dict(llm.model.lm_head.state_dict())
    load_projector(hf.model.multi_modal_projector, vlm.connector)
    hf.to(llm.model.dtype)
    return hf, processor


def load_projector(proj: torch.nn.Module, connector) -> None:
    """Llava's ``linear_1 -> act -> linear_2`` set to the connector: mlp2x_gelu's two layers, or for ``linear`` its
    layer and the identity."""
    if isinstance(connector, MLPConnector):
        proj.linear_1.load_state_dict(connector.layers[0].state_dict())
        proj.linear_2.load_state_dict(connector.layers[2].state_dict())
        return
    proj.linear_1.load_state_dict(connector.proj.state_dict())
    with torch.no_grad():
        proj.linear_2.weight.copy_(torch.eye(connector.out_dim))
        proj.linear_2.bias.zero_()


def llava_next_image_processor(vlm: VLM):
    """LLaVA-NeXT's image processor with this encoder's normalisation, input size and the model's pinpoints (the PIL
    backend where transformers has one: it resizes as ``encoders/anyres.py`` does)."""
    cls = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    side, own = vlm.encoder.info.image_size, vlm.encoder.processor
    return cls(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(own.image_mean),
        image_std=list(own.image_std),
        image_grid_pinpoints=[list(p) for p in vlm.tiling.geometry.pinpoints],
        do_center_crop=True,
        do_pad=True,
    )


def export_hf(vlm: VLM, out_dir: str | Path, merge: bool = True) -> Path:
    """Write a LlavaForConditionalGeneration directory (LlavaNext for an AnyRes model: config, safetensors, processor,
    chat template) atomically.
    A LoRA model's adapters are merged, or with ``merge=False`` written unmerged as ``<out>/adapter`` (peft's format,
    module names of the Llava model): ``model.load_adapter(<out>/adapter)`` or ``PeftModel.from_pretrained``."""
    adapter = llava_adapter(vlm) if not merge and vlm.llm.lora is not None else None
    hf, processor = to_llava(vlm, merge=merge)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if adapter is not None:
            config, state = adapter
            config.save_pretrained(tmp / ADAPTER_DIR)
            save_file(state, str(tmp / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def llava_adapter(vlm: VLM):
    """The LLM's LoRA adapters renamed for Llava (``model.layers.*`` -> ``model.language_model.layers.*``): peft's
    ``LoraConfig`` naming exactly the adapted modules of the language model (the vision tower's ``q_proj`` and
    friends are not touched) and the state dict as peft saves it."""
    from peft import LoraConfig, get_peft_model_state_dict

    llm = vlm.llm
    ours = llm.model.peft_config["default"]
    adapted = sorted(name for name, module in llm.model.get_base_model().named_modules() if hasattr(module, "lora_A"))

    def renamed(name: str) -> str:  # a LlamaForCausalLM / Qwen3ForCausalLM name -> the Llava model's
        return "model.language_model." + name[len("model.") :] if name.startswith("model.") else name

    config = LoraConfig(
        r=ours.r,
        lora_alpha=ours.lora_alpha,
        lora_dropout=ours.lora_dropout,
        target_modules=[renamed(n) for n in adapted],
        base_model_name_or_path=None,
    )
    prefix = "base_model.model."
    state = {
        prefix + renamed(k[len(prefix) :]): v.detach().contiguous().cpu()
        for k, v in get_peft_model_state_dict(llm.model, save_embedding_layers=False).items()
    }
    return config, state
