"""Write a transformers Llama checkpoint as a GGUF file with the ``gguf`` package's writer, laid out as llama.cpp's
``convert_hf_to_gguf.py`` lays out a Llama: its tensor names, Q and K rows permuted for llama.cpp's RoPE, the
byte-level BPE tokenizer as a ``gpt2`` vocabulary with its merges, special ids and the chat template. Tests load it
back through transformers' ``gguf_file=`` (which undoes the permutation) and compare with the source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer, out: Path) -> Path:
    import gguf

    cfg = model.config
    rope = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(out.stem)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.unk_token_id is not None:
        w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_add_bos_token(True)
    w.add_chat_template(tokenizer.chat_template)
    for name, tensor in model.state_dict().items():
        a = tensor.float().numpy()
        if name in TOP:
            key = TOP[name]
        else:
            parts = name.split(".")  # model.layers.<i>.<module>.weight
            module = ".".join(parts[3:-1])
            key = f"blk.{parts[2]}.{TENSORS[module]}.{parts[-1]}"
            if module == "self_attn.q_proj":
                a = permute(a, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(key, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def tiny_llama_checkpoints(root: Path, layers: int | None = None) -> tuple[Path, Path]:
    """The tiny Llama preset (with ``layers`` decoder layers of fresh random weights where given) written twice: as a
    safetensors directory and as a GGUF file. transformers' GGUF reader gives a ``gpt2`` vocabulary an
    ``<|endoftext|>`` token when it has none (real ones have it), so the source gets it first, with its embedding row
    at the mean: both files then hold the same vocabulary."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from llms import build_llm

    source = build_llm("tinyllama").model.name_or_path  # the tiny preset's directory, as saved (safetensors)
    tok = AutoTokenizer.from_pretrained(source)
    if layers is None:
        model = LlamaForCausalLM.from_pretrained(source)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(AutoConfig.from_pretrained(source, num_hidden_layers=layers))
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
    model.save_pretrained(root / "safetensors")
    tok.save_pretrained(root / "safetensors")
    return root / "safetensors", write_llama_gguf(model, tok, root / "tiny-llama.gguf")
