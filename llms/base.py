"""The LLM-backend contract: a transformers causal LM, its tokenizer, its chat template and ``<image>`` handling.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``; the string ``<image>`` inside
a user turn marks where the visual tokens go. The backend renders it with the tokenizer's own chat template and labels
**exactly what the model must generate after each generation prompt, through the end-of-turn token**: for assistant
turn i, the characters between ``render(messages[:i], add_generation_prompt=True)`` and the first end-of-turn string
after it. Everything else (system, user turns, the image, padding) gets the ignore index -100. Labels are not
shifted: transformers' causal-LM loss shifts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from connector_zoo.hf import gguf_source, load_pretrained, plain_model, preset_dir, random_geometry
from connector_zoo.settings import SettingError
from llms.attention import use_varlen
from llms.lora import LORA_DEFAULTS, normalize_lora, quantization_config  # noqa: F401  (this module's API)

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    #: per token, its position id, where that is not its index: a sample of branches (``encode_branches``)
    positions: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class TemplateError(ValueError):
    """The chat template does not render prefix-stably, or a conversation is malformed."""


class LLMBackend(nn.Module):
    """Base class of every LLM backend. Subclasses set ``model_cls``, ``config_cls``, ``presets`` and templates."""

    registered_name: str = ""
    model_cls: type
    config_cls: type
    presets: dict[str, dict[str, Any]] = {}
    default_checkpoint = "tiny"
    #: used when the checkpoint's tokenizer has no chat template, and saved into tiny presets
    chat_template: str = ""
    #: keyword arguments for the template when building a generation prompt
    generation_template_kwargs: dict[str, Any] = {}
    prepend_bos = False
    #: special tokens of the tiny preset's tokenizer (roles: bos/eos/pad/unk/additional)
    tiny_special_tokens: dict[str, Any] = {}
    #: hub id -> the real checkpoint's config (widths, vocabulary, context; ``save_dtype``: its weights' dtype), for
    #: ``random:<hub id>[:layers=N]`` (see connector_zoo.hf); the tokenizer of such a checkpoint is the tiny one
    geometries: dict[str, dict[str, Any]] = {}

    def __init__(
        self,
        checkpoint: str,
        frozen: bool = True,
        dtype: str | None = None,
        lora: dict[str, Any] | None = None,
        quantization: str | None = None,
    ):
        """``dtype``: the weights' storage dtype (``float32`` unless given: a half-precision checkpoint is not
        silently trained in half). ``lora``: LoRA adapters on the LLM (:meth:`add_lora`). ``quantization``:
        ``"nf4"`` loads the base weights in 4 bits through bitsandbytes (QLoRA; CUDA only)."""
        super().__init__()
        self.checkpoint = checkpoint
        path, params, name = checkpoint, self.presets.get(checkpoint), checkpoint
        random = random_geometry(checkpoint, self.geometries, "num_hidden_layers", default_layers=1)
        if random:
            name, params = random
        if params is not None:
            key = {**params, "tokenizer": self.tiny_tokenizer_key()}  # a changed template is a new preset
            path = preset_dir(self.registered_name, name, key, lambda d: self.build_tiny(d, params=params))
        # a GGUF file: weights, tokenizer and chat template from it (transformers' gguf_file=)
        path, where = gguf_source(path) if params is None else (path, {})
        self.check_architecture(
            load_pretrained(AutoConfig.from_pretrained, path, f"{self.registered_name} config", **where)
        )
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, path, f"{self.registered_name} tokenizer", **where
        )
        extra = {"quantization_config": quantization_config(quantization)} if quantization else {}
        what, dtype = f"{self.registered_name} model", getattr(torch, dtype or "float32")
        model = load_pretrained(self.model_cls.from_pretrained, path, what, dtype=dtype, **where, **extra)
        self.model = plain_model(model)
        use_varlen(self.model)  # packed rows attend per sample, at no cost beyond it (llms/attention.py)
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = self.chat_template
        self._add_special_tokens()
        self.frozen = frozen
        self.model.requires_grad_(not frozen)
        self.lora: dict[str, Any] | None = None
        if lora:
            self.add_lora(lora)

    # -------------------------------------------------------------------- LoRA
    def add_lora(self, settings: dict[str, Any]) -> None:
        """Wrap the causal LM with peft LoRA adapters (base weights frozen, adapters trainable and fp32).

        ``settings``: ``r``, ``alpha``, ``dropout``, ``targets`` (module names, or ``all-linear``: every linear
        layer but the output head, which is LLaVA's ``find_all_linear_names``). Idempotent for the same settings.
        """
        from peft import LoraConfig, get_peft_model

        settings = normalize_lora(settings)
        if self.lora is not None:
            if self.lora != settings:
                raise ValueError(f"the LLM already has LoRA {self.lora}; cannot add {settings}")
            return
        targets = settings["targets"]
        config = LoraConfig(
            r=settings["r"],
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            target_modules=targets if targets == "all-linear" else targets.split("+"),
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(self.model, config, autocast_adapter_dtype=True)
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        self.lora = settings
        self.spec = {**getattr(self, "spec", {}), "lora": settings}

    def save_adapter(self, directory: str | Path) -> Path:
        """The LoRA adapters as peft writes them (``adapter_config.json`` + ``adapter_model.safetensors``, through
        ``PeftModel.save_pretrained``), with the tokenizer: ``PeftModel.from_pretrained(base_llm, directory)`` loads
        them. Where this backend grew the vocabulary (``<image>``, ``<pad>``), the embedding and output matrices are
        saved too (peft's ``save_embedding_layers``), so that the base LLM resized to ``len(tokenizer)`` holds exactly
        these rows once loaded."""
        if self.lora is None:
            raise ValueError("this LLM has no LoRA adapters to save")
        directory = Path(directory)
        self.model.save_pretrained(directory, save_embedding_layers=self.grew_vocabulary)
        self.tokenizer.save_pretrained(directory)
        return directory

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights (for export); the backend is a plain causal LM again."""
        if self.lora is not None:
            self.model = self.model.merge_and_unload()
            self.lora = None
            self.spec = {k: v for k, v in getattr(self, "spec", {}).items() if k != "lora"}

    def unload_lora(self) -> None:
        """Remove the adapters without merging them (the base weights as loaded); the backend is a plain causal LM
        again."""
        if self.lora is not None:
            self.model = self.model.unload()
            self.lora = None
            self.spec = {k: v for k, v in getattr(self, "spec", {}).items() if k != "lora"}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None = None, **kwargs: Any) -> LLMBackend:
        return cls(checkpoint or cls.default_checkpoint, **kwargs)

    def check_architecture(self, config) -> None:
        """A checkpoint whose architecture is not this backend's is refused (its weights would load partly, the
        rest newly initialised, and the run would go on)."""
        want = getattr(getattr(self, "config_cls", None), "model_type", None)
        if want is not None and config.model_type != want:
            from llms import LLMS

            fits = [
                n
                for n in LLMS.names()
                if getattr(LLMS.get(n), "config_cls", None) is not None
                and LLMS.get(n).config_cls.model_type == config.model_type
            ]
            hint = f"use --llm {' or '.join(fits)}" if fits else "no backend here takes it"
            raise SettingError(
                f"{self.checkpoint!r} holds a {config.model_type!r} model, but --llm "
                f"{self.registered_name} takes {want!r} checkpoints; {hint}"
            )

    # ------------------------------------------------------------------ tokens
    def _add_special_tokens(self) -> None:
        """``<image>`` as a special token (and ``<pad>`` where the tokenizer has none); embeddings resized.

        New embedding rows are set to the mean of the old ones (deterministic, so a frozen LLM rebuilds exactly).
        """
        tok = self.tokenizer
        new = []
        if IMAGE_TOKEN not in tok.get_vocab():
            new.append(AddedToken(IMAGE_TOKEN, special=True, normalized=False))
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": "<pad>"})
        if new:
            tok.add_tokens(new, special_tokens=True)
        old = self.model.get_input_embeddings().weight.shape[0]
        self.grew_vocabulary = len(tok) > old  # (a LoRA adapter then carries the embedding rows: save_adapter)
        if len(tok) > old:
            self.model.resize_token_embeddings(len(tok), mean_resizing=False)
            with torch.no_grad():
                for emb in {
                    id(m): m
                    for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings())
                    if m is not None
                }.values():
                    emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tok.pad_token_id

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.end_of_turn)

    @property
    def end_of_turn(self) -> str:
        return self.tokenizer.eos_token

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    # --------------------------------------------------------------- templates
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if (
            self.prepend_bos
            and self.tokenizer.bos_token_id is not None
            and not text.startswith(self.tokenizer.bos_token)
        ):
            ids, offsets = [self.tokenizer.bos_token_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def encode_conversation(self, messages: list[dict[str, str]]) -> EncodedConversation:
        """Token ids and labels (-100 everywhere but the assistant turns and their end-of-turn token)."""
        check_messages(messages)
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(prefix):
                raise TemplateError(
                    f"{self.registered_name}: the chat template does not render prefix-stably at turn {i}; "
                    f"cannot locate the assistant answer (prefix {prefix[-60:]!r})"
                )
            end = full.find(self.end_of_turn, len(prefix))
            if end < 0:
                raise TemplateError(f"{self.registered_name}: no end-of-turn {self.end_of_turn!r} after turn {i}")
            spans.append((len(prefix), end + len(self.end_of_turn)))
        ids, offsets = self._tokenize(full)
        labels = [IGNORE_INDEX] * len(ids)
        for t, (start, stop) in enumerate(offsets):
            if stop > start and any(start < s_end and stop > s_start for s_start, s_end in spans):
                labels[t] = ids[t]
        return EncodedConversation(ids, labels)

    def encode_branches(self, branches: list[list[dict[str, str]]]) -> EncodedConversation:
        """Conversations that open alike (the same image and prompt) as one sample: their common opening once, then
        the rest of each, its position ids numbered on from the opening as if it followed it alone. Under
        ``llms/attention.py``'s varlen attention each rest attends to the opening and to itself only, never to another
        branch (``branch_mask``), so each branch trains exactly as its conversation alone would, and the opening (with
        an image's visual tokens) is computed once for all of them."""
        encoded = [self.encode_conversation(m) for m in branches]
        if len(encoded) == 1:
            return encoded[0]
        first = encoded[0].input_ids
        opening = min(
            next((i for i, (a, b) in enumerate(zip(first, e.input_ids)) if a != b), min(len(first), len(e)))
            for e in encoded[1:]
        )
        for k, e in enumerate(encoded):
            # the opening's last token predicts each rest's first: that token must be no label of any branch
            if opening == 0 or opening >= len(e) or any(y != IGNORE_INDEX for y in e.labels[: opening + 1]):
                raise TemplateError(
                    f"{self.registered_name}: branch {k} does not open like the others and then go on with a prompt "
                    f"before its answer (shared opening {opening} tokens); branches need a common opening"
                )
        ids, labels, positions = list(first[:opening]), list(encoded[0].labels[:opening]), list(range(opening))
        for e in encoded:
            ids += e.input_ids[opening:]
            labels += e.labels[opening:]
            positions += range(opening, len(e))
        return EncodedConversation(ids, labels, positions)

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt that ends with the generation prompt (for ``generate``)."""
        check_messages(messages, need_assistant=False)
        text = self.render(messages, add_generation_prompt=True, **self.generation_template_kwargs)
        return self._tokenize(text)[0]

    # ------------------------------------------------------------------ preset
    @classmethod
    def tiny_tokenizer_key(cls) -> dict[str, Any]:
        """What a tiny preset's tokenizer is made of (its template and special tokens): part of the cache key of every
        directory that holds one, so editing a template never serves a preset built with the old one."""
        return {"chat_template": cls.chat_template, "special": cls.tiny_special_tokens, "builder": 1}

    @classmethod
    def build_tiny(
        cls,
        out_dir,
        preset: str = "tiny",
        corpus: list[str] | None = None,
        seed: int = 0,
        vocab_size: int = 384,
        params: dict[str, Any] | None = None,
        **overrides,
    ):
        """Write a random checkpoint (model + offline tokenizer) with ``save_pretrained``; load it by path.

        ``params``: the model config (default: the preset's); a ``vocab_size`` in it sizes the embeddings (a real
        vocabulary) while the tokenizer stays tiny; ``save_dtype`` stores the weights as the real checkpoint does."""
        from llms._tiny import build_tiny_tokenizer

        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer(corpus, cls.tiny_special_tokens, cls.chat_template, vocab_size)
        params = {**(params if params is not None else cls.presets[preset]), **overrides}
        save_dtype = params.pop("save_dtype", None)
        config = cls.config_cls(
            vocab_size=params.pop("vocab_size", len(tokenizer)),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.eos_token),
            pad_token_id=tokenizer.pad_token_id,
            **params,
        )
        model = cls.model_cls(config)
        if save_dtype:
            model.to(getattr(torch, save_dtype))
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def check_messages(messages: list[dict[str, str]], need_assistant: bool = True) -> None:
    """A malformed conversation raises with what is wrong and where."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError(f"a conversation must be a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise TemplateError(f"message {i} must be a dict with role system/user/assistant, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} ({m['role']}) has no text content")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise TemplateError("the conversation has no assistant turn, so nothing would be trained")
