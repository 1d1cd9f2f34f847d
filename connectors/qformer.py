"""``qformer``: BLIP-2's Querying Transformer (LAVIS ``blip2.py`` ``init_Qformer``; MiniGPT-4 reuses it frozen).

    image tokens (B, 1+N, Dv) -> ln_vision = LayerNorm(Dv)                      (CLS kept, as BLIP-2 does)
    query_tokens (1, Q, Hq) ~ N(0, 0.02), expanded over the batch
    Blip2QFormerModel: LayerNorm + dropout on the queries (no position embeddings), a BERT-style encoder of
        ``num_layers`` blocks, cross-attention to the image tokens (K/V of width Dv) in blocks where
        ``layer % cross_attention_freq == 0`` (freq 2 -> 0, 2, 4, ...)
    -> (B, Q, Hq) -> proj = Linear(Hq, D) (MiniGPT-4's ``llama_proj``) -> Q visual tokens.

transformers' ``Blip2QFormerModel`` is reused: it holds neither the queries nor the projection, which this connector
owns. Real-size defaults are BLIP-2's: 32 queries, width 768, 12 layers, 12 heads, FFN 3072, frequency 2.

``init_from`` (optional):
- ``"bert:/path/to/bert-base-uncased"``: LAVIS' initialisation of the self-attention and FFN from BERT-base, with the
  key renames ``attention.self`` -> ``attention.attention``, ``intermediate``/``output`` -> ``intermediate_query``/
  ``output_query``, ``embeddings.LayerNorm`` -> ``layernorm``; cross-attention stays random.
- ``"blip2:/path/to/blip2-opt-2.7b"``: the Q-Former, the queries and ``ln_vision`` (stored by transformers as
  ``vision_model.post_layernorm``) of a real BLIP-2 checkpoint; its sizes override the settings. With
  ``freeze_qformer=True`` only the projection trains: the MiniGPT-4 setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from connector_zoo.settings import SettingError, check
from connectors import register
from connectors.base import Connector, ConnectorOutput
from encoders.base import EncoderInfo, VisionFeatures


@register("qformer")
class QFormerConnector(Connector):
    """BLIP-2 Q-Former: 32 learned queries cross-attend to the image (every other layer), then Linear to the LLM."""

    #: a small configuration for tests and the CPU mini world (the defaults are BLIP-2's real size)
    small_settings = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_freq: int = 2,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
        init_from: str | None = None,
        freeze_qformer: bool = False,
    ):
        super().__init__(in_dim, out_dim)
        for setting, value in (
            ("num_queries", num_queries),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("intermediate_size", intermediate_size),
            ("cross_attention_freq", cross_attention_freq),
        ):
            check("qformer", setting, value, int, lo=1)
        if hidden_size % num_heads:
            raise SettingError(f"qformer: hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
        check("qformer", "dropout", dropout, float, lo=0, hi=1, hi_open=True)
        check("qformer", "initializer_range", initializer_range, float, lo=0, lo_open=True)
        check("qformer", "init_from", init_from, str, optional=True)
        check("qformer", "freeze_qformer", freeze_qformer, bool)
        blip2_config = read_blip2_qformer_config(init_from) if init_from and init_from.startswith("blip2:") else None
        if blip2_config is not None:  # the checkpoint's sizes win
            hidden_size, num_layers = blip2_config["hidden_size"], blip2_config["num_hidden_layers"]
            num_heads, intermediate_size = blip2_config["num_attention_heads"], blip2_config["intermediate_size"]
            cross_attention_freq = blip2_config.get("cross_attention_frequency", cross_attention_freq)
            num_queries = blip2_config.get("num_query_tokens", num_queries)
        self.num_queries = num_queries
        self.ln_vision = nn.LayerNorm(in_dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        nn.init.normal_(self.query_tokens, mean=0.0, std=initializer_range)
        self.config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_freq,
            encoder_hidden_size=in_dim,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            initializer_range=initializer_range,
        )
        self.qformer = Blip2QFormerModel(self.config)
        self.proj = nn.Linear(hidden_size, out_dim)
        if init_from:
            self.load_pretrained(init_from)
        if freeze_qformer:
            for module in (self.ln_vision, self.qformer):
                module.requires_grad_(False)
            self.query_tokens.requires_grad_(False)

    def cross_attention_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.qformer.encoder.layer) if getattr(layer, "has_cross_attention", False)]

    def forward(self, features: VisionFeatures) -> ConnectorOutput:
        image = features.patches if features.cls is None else torch.cat([features.cls[:, None], features.patches], 1)
        image = self.ln_vision(image)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        return ConnectorOutput.dense(self.proj(out[:, : self.num_queries]))

    def max_tokens(self, info: EncoderInfo) -> int:
        return self.num_queries

    # ---------------------------------------------------------------- loading
    def load_pretrained(self, init_from: str) -> None:
        kind, _, path = init_from.partition(":")
        if kind not in ("bert", "blip2") or not path:
            raise ValueError(f"qformer init_from must be 'bert:/local/dir' or 'blip2:/local/dir', got {init_from!r}")
        tensors = read_safetensors_dir(Path(path))
        if kind == "bert":
            mapped = {bert_to_qformer_key(k): v for k, v in tensors.items()}
            own = self.qformer.state_dict()
            state = {k: v for k, v in mapped.items() if k in own}
            if not state:
                raise ValueError(f"{path} holds no BERT encoder weights (expected keys like encoder.layer.0.*)")
            check_shapes(state, own, path)
            self.qformer.load_state_dict(state, strict=False)
            return
        state = {k.split("qformer.", 1)[1]: v for k, v in tensors.items() if "qformer." in k}
        queries = next((v for k, v in tensors.items() if k.endswith("query_tokens")), None)
        ln = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if "vision_model.post_layernorm." in k}
        if not state or queries is None or not ln:
            raise ValueError(
                f"{path} is not a BLIP-2 checkpoint (needs qformer.*, query_tokens and the vision "
                "model's post_layernorm, i.e. ln_vision)"
            )
        check_shapes(state, self.qformer.state_dict(), path)
        check_shapes({"ln_vision.weight": ln["weight"]}, {"ln_vision.weight": self.ln_vision.weight}, path)
        self.qformer.load_state_dict(state, strict=True)
        self.ln_vision.load_state_dict(ln)
        with torch.no_grad():
            self.query_tokens.copy_(queries.reshape(self.query_tokens.shape))


def bert_to_qformer_key(key: str) -> str:
    key = key.removeprefix("bert.")
    if key.startswith("embeddings.LayerNorm."):
        return "layernorm." + key.rsplit(".", 1)[1]
    key = key.replace(".attention.self.", ".attention.attention.")
    key = key.replace(".intermediate.", ".intermediate_query.")
    if ".attention." not in key:
        key = key.replace(".output.", ".output_query.")
    return key


def check_shapes(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path) -> None:
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs qformer {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"{path} does not fit this Q-Former: {wrong[:4]}; use an encoder of the checkpoint's "
            "width and leave the qformer sizes at the checkpoint's"
        )


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"no .safetensors weights in {path} (this loader reads safetensors only)")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[key] = f.get_tensor(key)
    return out


def read_blip2_qformer_config(init_from: str) -> dict | None:
    path = Path(init_from.partition(":")[2]) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: 'blip2:' expects a local BLIP-2 checkpoint directory")
    config = json.loads(path.read_text())
    qformer = dict(config.get("qformer_config", {}))
    qformer.setdefault("num_query_tokens", config.get("num_query_tokens", 32))
    defaults = Blip2QFormerConfig().to_dict()
    return {k: qformer.get(k, defaults.get(k)) for k in (*defaults, "num_query_tokens")}
