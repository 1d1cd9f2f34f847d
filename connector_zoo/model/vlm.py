"""The composed model: encode -> connect -> splice the visual tokens where ``<image>`` stands -> LLM.

It receives built components and never dispatches on strings. A sample holds at most one ``<image>`` token; its
visual tokens (only the real ones, ``mask`` True) replace it, so samples in a batch may carry different numbers of
visual tokens. Training batches are right-padded, generation batches left-padded; pad positions get attention mask
0 and label -100, visual positions get label -100. A sample longer than ``max_length`` raises
:class:`SampleTooLong` instead of being cut: truncation never cuts into the visual tokens or silently drops answers.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from connector_zoo.io import atomic_path, read_json, verify_file, write_manifest
from connector_zoo.model.inputs import SampleTooLong, VLMInputs, VLMOutput  # noqa: F401  (part of this module's API)
from connector_zoo.model.tiling import AnyRes, build_tiling
from connector_zoo.registry import names_from_file
from connectors import build_connector
from connectors.base import Connector, ConnectorOutput
from encoders import build_encoder
from encoders.base import VisionEncoder, VisionFeatures
from llms import build_llm
from llms.attention import VARLEN, VARLEN_IMPLEMENTATIONS
from llms.base import IGNORE_INDEX, LLMBackend
from llms.hooks import VisualSpans, visual_token_hook
from llms.loss import causal_lm_forward

#: a LoRA run's adapters as peft saves them (``PeftModel.from_pretrained(base_llm, <run>/adapter)``)
ADAPTER_DIR = "adapter"
CONFIG_NAME = "vlm_config.json"
WEIGHTS_NAME = "trainable.safetensors"
# the transformers directory of the same model (connector_zoo/model/modeling.py writes it)
HF_CONFIG_NAME, HF_WEIGHTS_NAME, HF_INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"


#: the width of a one-row packed batch is rounded up to a multiple of this many tokens (1: exactly its samples). A row
#: of a new width is a new matrix shape for every linear layer; rounding to 64 bought 1.01x a step on CPU
#: (benchmarks/shape_churn.py, docs/pretrained-world.md), so it stays 1
PACK_MULTIPLE = 1


class VLM(nn.Module):
    """``tiling``: None (each image resized to the encoder's input) or a spec ``{"name": "anyres", "grid_pinpoints":
    [[h, w], ...]}``: each image becomes a global view and tiles, connected view by view and merged
    (``connector_zoo/model/tiling.py``); its inputs then carry each image's ``image_sizes``."""

    def __init__(
        self,
        encoder: VisionEncoder,
        connector: Connector,
        llm: LLMBackend,
        max_length: int | None = None,
        tiling: dict | None = None,
    ):
        super().__init__()
        if connector.out_dim != llm.hidden_size or connector.in_dim != encoder.info.hidden_size:
            raise ValueError(
                f"connector maps {connector.in_dim} -> {connector.out_dim}, but the encoder gives "
                f"{encoder.info.hidden_size} and the LLM takes {llm.hidden_size}"
            )
        self.encoder, self.connector, self.llm = encoder, connector, llm
        self.max_length = max_length or getattr(llm.model.config, "max_position_embeddings", None)
        self.tiling: AnyRes | None = build_tiling(tiling, encoder.info, connector, llm.hidden_size)
        #: a one-row packed batch (varlen attention) is as wide as its samples, rounded up to a multiple of this
        #: (1: exactly as wide); see :meth:`pack_layout`
        self.pack_multiple = PACK_MULTIPLE

    # ------------------------------------------------------------- components
    @classmethod
    def build(
        cls,
        encoder: dict[str, Any],
        connector: dict[str, Any],
        llm: dict[str, Any],
        max_length: int | None = None,
        tiling: dict[str, Any] | None = None,
    ) -> VLM:
        """Build from specs ``{"name": ..., "checkpoint": ..., **settings}`` (the JSON that ``save`` writes)."""
        enc = build_encoder(**encoder)
        lm = build_llm(**llm)
        conn_spec = dict(connector)
        conn = build_connector(conn_spec.pop("name"), enc.info.hidden_size, lm.hidden_size, **conn_spec)
        return cls(enc, conn, lm, max_length, tiling)

    def specs(self) -> dict[str, Any]:
        specs = {
            "encoder": self.encoder.spec,
            "connector": self.connector.spec,
            "llm": self.llm.spec,
            "max_length": self.max_length,
        }
        if self.tiling is not None:  # (absent, not null, without tiling: older files read the same)
            specs["tiling"] = self.tiling.spec
        return specs

    def max_visual_tokens(self) -> int:
        """The most visual tokens one image can get (the LLM's context budget is checked against it)."""
        if self.tiling is not None:
            return self.tiling.max_tokens(self.connector, self.encoder.info)
        return self.connector.max_tokens(self.encoder.info)

    # ----------------------------------------------------------------- vision
    def preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """(pixel values, image sizes) of PIL images: one row per image, or with tiling one per view (each image's
        global view, then its tiles) and each image's (height, width)."""
        if self.tiling is None:
            return self.encoder.preprocess(images), None
        views = [view for im in images for view in self.tiling.geometry.views(im)]
        return self.encoder.preprocess(views), [(im.height, im.width) for im in images]

    def encode(self, pixel_values: torch.Tensor) -> VisionFeatures:
        return self.encoder(pixel_values, with_cls_attention=self.connector.feature_request)

    def visual_tokens(self, inputs: VLMInputs, connector: Connector | None = None) -> ConnectorOutput | None:
        """The visual tokens of a batch's images: ``connector`` (default: this model's; a profile swaps in a reducer)
        on their features, merged per image when the model tiles."""
        connector = connector or self.connector
        features = inputs.features
        if features is None and inputs.pixel_values is not None:
            features = self.encode(inputs.pixel_values.to(self.device))
        if features is None:
            return None
        # features reach the connector in its own dtype (fp32 master weights), whatever the encoder is stored in
        dtype = next((p.dtype for p in connector.parameters()), torch.float32)
        visual = connector(features.to(self.device, dtype=dtype))
        if self.tiling is None:
            return visual
        if inputs.image_sizes is None:
            raise ValueError(
                "this model tiles its images (AnyRes): its inputs need image_sizes, each image's original "
                "(height, width) (VLM.preprocess gives them with the views' pixels)"
            )
        return self.tiling(visual, inputs.image_sizes, connector.output_grid(*features.grid))

    @property
    def device(self) -> torch.device:
        return next(self.llm.model.parameters()).device

    # ---------------------------------------------------------------- splice
    def splice(self, inputs: VLMInputs, visual: ConnectorOutput | None, padding_side: str = "right"):
        """-> inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L) or None, position_ids (B, L)."""
        has_image = inputs.has_image or [visual is not None] * len(inputs.input_ids)
        n_images = sum(has_image)
        if visual is not None and visual.tokens.shape[0] != n_images:
            raise ValueError(f"{n_images} samples have an image but {visual.tokens.shape[0]} were encoded")
        embed_dtype = self.llm.model.get_input_embeddings().weight.dtype
        rows, row_labels = [], []
        row_positions: list[torch.Tensor | None] = [None] * len(inputs.input_ids)  # a sample of branches: its own
        image_row = 0
        for b, ids in enumerate(inputs.input_ids):
            ids = ids.to(self.device)
            labels = inputs.labels[b].to(self.device) if inputs.labels is not None else None
            given = inputs.positions[b] if inputs.positions is not None else None
            where = (ids == self.llm.image_token_id).nonzero().flatten()
            if has_image[b]:
                if len(where) != 1:
                    raise ValueError(f"sample {b} has an image but {len(where)} <image> tokens in its text (need 1)")
                p = int(where[0])
                vis = visual.tokens[image_row][visual.mask[image_row]].to(embed_dtype)
                image_row += 1
                rows.append(torch.cat([self.llm.embed(ids[:p]), vis, self.llm.embed(ids[p + 1 :])]))
                if labels is not None:
                    fill = labels.new_full((vis.shape[0],), IGNORE_INDEX)
                    row_labels.append(torch.cat([labels[:p], fill, labels[p + 1 :]]))
                if given is not None:  # the <image> id becomes as many ids as visual tokens, the later ones shift
                    given = given.to(self.device)
                    n = vis.shape[0]
                    row_positions[b] = torch.cat(
                        [given[:p], given[p] + torch.arange(n, device=self.device), given[p + 1 :] + n - 1]
                    )
            else:
                row_positions[b] = given.to(self.device) if given is not None else None
                if len(where):
                    raise ValueError(f"sample {b} has an <image> token in its text but no image")
                rows.append(self.llm.embed(ids))
                if labels is not None:
                    row_labels.append(labels)
            if self.max_length and rows[-1].shape[0] > self.max_length:
                n_vis = rows[-1].shape[0] - ids.shape[0] + 1 if has_image[b] else 0
                raise SampleTooLong(
                    f"sample {b} needs {rows[-1].shape[0]} tokens ({n_vis} visual) but the LLM context budget is "
                    f"{self.max_length}; it is not truncated: drop it, shorten its text, or use fewer visual tokens"
                )
        branched = any(p is not None for p in row_positions)
        if branched and (not inputs.pack or self.llm.model.config._attn_implementation != VARLEN):
            raise ValueError(
                "samples of branches (--qa-branches) train on packed rows under this project's varlen sdpa attention "
                f"only (packing {'on' if inputs.pack else 'off'}, attention "
                f"{self.llm.model.config._attn_implementation!r}): --packing on, and the LLM's default sdpa attention"
            )
        if inputs.pack:
            return self._pack(rows, row_labels if inputs.labels is not None else None, row_positions)
        return self._pad(rows, row_labels if inputs.labels is not None else None, padding_side)

    def _pack(
        self,
        rows: list[torch.Tensor],
        labels: list[torch.Tensor] | None,
        positions: list[torch.Tensor | None] | None = None,
    ):
        """Several samples per row; position ids restart at each sample, the attention mask is None, and attention
        stays inside each sample. Where the LLM's attention cuts rows at those restarts itself (``llms/attention.py``'s
        varlen sdpa on CPU, flash-attention's varlen kernels on GPU), the whole batch is one row with no padding at
        all; otherwise (eager, flex) rows as wide as the longest sample (:func:`pack_layout`), where transformers
        builds the block-diagonal mask from the position ids (``find_packed_sequence_indices``) and a short row's
        trailing padding is a segment of its own (positions from 0, no label). A sample's first label is never a
        target (no token of its own comes before it), as without packing."""
        layout, width = self.pack_layout([r.shape[0] for r in rows])
        n_rows = 1 + max(row for row, _ in layout)
        D = rows[0].shape[-1]
        embeds = rows[0].new_zeros(n_rows, width, D)
        position_ids = torch.zeros(n_rows, width, dtype=torch.long, device=embeds.device)
        filled = [0] * n_rows
        out_labels = (
            torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long, device=embeds.device) if labels else None
        )
        for b, (row, start) in enumerate(layout):
            n = rows[b].shape[0]
            embeds[row, start : start + n] = rows[b]
            given = positions[b] if positions is not None else None
            position_ids[row, start : start + n] = given if given is not None else torch.arange(n, device=embeds.device)
            if out_labels is not None:
                out_labels[row, start : start + n] = labels[b]
                out_labels[row, start] = IGNORE_INDEX
            filled[row] = max(filled[row], start + n)
        for row, end in enumerate(filled):
            position_ids[row, end:] = torch.arange(width - end, device=embeds.device)
        return embeds, None, out_labels, position_ids

    def pack_layout(self, lengths: list[int]) -> tuple[list[tuple[int, int]], int]:
        """``(row, start)`` of each sample in a packed batch, and the rows' width (see :meth:`_pack`)."""
        if self.llm.model.config._attn_implementation in VARLEN_IMPLEMENTATIONS:
            starts = [sum(lengths[:b]) for b in range(len(lengths))]
            return [(0, start) for start in starts], -(-sum(lengths) // self.pack_multiple) * self.pack_multiple
        return pack_layout(lengths), max(lengths)

    def _pad(self, rows: list[torch.Tensor], labels: list[torch.Tensor] | None, side: str):
        longest = max(r.shape[0] for r in rows)
        B, D = len(rows), rows[0].shape[-1]
        embeds = rows[0].new_zeros(B, longest, D)
        mask = torch.zeros(B, longest, dtype=torch.long, device=embeds.device)
        out_labels = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long, device=embeds.device) if labels else None
        for b, row in enumerate(rows):
            n = row.shape[0]
            sl = slice(longest - n, longest) if side == "left" else slice(0, n)
            embeds[b, sl] = row
            mask[b, sl] = 1
            if out_labels is not None:
                out_labels[b, sl] = labels[b]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, out_labels, position_ids

    # --------------------------------------------------------------- forward
    def forward(self, inputs: VLMInputs, full_logits: bool = False):
        """Causal-LM output; ``loss`` includes the connector's auxiliary loss (if any) when labels are given. With
        labels, ``logits`` are the labelled positions' rows only (llms/loss.py) unless ``full_logits``."""
        visual = self.visual_tokens(inputs)
        embeds, mask, labels, position_ids = self.splice(inputs, visual)
        with self.llm_hook(inputs, visual, mask, labels, left_padded=False):
            lm_loss, logits = causal_lm_forward(
                self.llm.model,
                labels,
                full_logits,
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=False,  # (no cache: also what lets transformers see packed rows in the position ids)
            )
        aux = None if visual is None else visual.aux_loss
        loss = lm_loss if lm_loss is None or aux is None else lm_loss + aux
        return VLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux,
            logits=logits,
            visual_tokens=None if visual is None else visual.num_tokens,
            positions=torch.tensor(embeds.shape[0] * embeds.shape[1]),
        )

    @torch.no_grad()
    def generate(
        self,
        images: list[Image.Image | None] | None,
        prompts: list[str] | list[list[dict[str, str]]],
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> list[str]:
        """Greedy generation (by default) for a batch of (image or None, prompt); returns the decoded answers."""
        images = images if images is not None else [None] * len(prompts)
        has_image = [im is not None for im in images]
        pixel_values, sizes = (
            self.preprocess([im for im in images if im is not None]) if any(has_image) else (None, None)
        )
        ids = self.prompt_ids(has_image, prompts)
        out = self.generate_ids(
            VLMInputs(ids, pixel_values=pixel_values, has_image=has_image, image_sizes=sizes), max_new_tokens, **kwargs
        )
        return self.decode(out)

    def prompt_ids(self, has_image: list[bool], prompts) -> list[torch.Tensor]:
        """Prompt token ids; ``<image>`` is put at the start of the first user turn where an image has none."""
        out = []
        for b, prompt in enumerate(prompts):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if has_image[b] and "<image>" not in messages[0]["content"]:
                messages = [{**messages[0], "content": "<image>\n" + messages[0]["content"]}, *messages[1:]]
            out.append(torch.tensor(self.llm.encode_prompt(messages)))
        return out

    @torch.no_grad()
    def generate_ids(self, inputs: VLMInputs, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """New token ids (B, T) for left-padded prompts; greedy unless sampling arguments are given."""
        visual = self.visual_tokens(inputs)
        embeds, mask, _, _ = self.splice(inputs, visual, padding_side="left")
        kwargs.setdefault("do_sample", False)
        with self.llm_hook(inputs, visual, mask, None, left_padded=True):
            return self.llm.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.llm.eos_token_id,
                pad_token_id=self.llm.pad_token_id,
                **kwargs,
            )

    def llm_hook(
        self,
        inputs: VLMInputs,
        visual: ConnectorOutput | None,
        mask,
        labels,
        left_padded: bool,
        connector: Connector | None = None,
    ):
        """``connector``'s (default: this model's) LLM-side hook (FastV) with this batch's image spans, or a no-op."""
        hook = getattr(connector or self.connector, "llm_hook", None)
        if hook is None or visual is None:
            return contextlib.nullcontext()
        if inputs.pack:
            raise ValueError(
                f"{(connector or self.connector).registered_name} prunes visual tokens inside the LLM, one image per "
                "row: it cannot train on packed rows (--packing off)"
            )
        has_image = inputs.has_image or [True] * len(inputs.input_ids)
        rows, tok = iter(range(visual.tokens.shape[0])), self.llm.image_token_id
        image_at = [int((ids == tok).nonzero()[0]) if has else None for ids, has in zip(inputs.input_ids, has_image)]
        counts = [int(visual.mask[next(rows)].sum()) if has else 0 for has in has_image]
        spans = VisualSpans.of(image_at, counts, mask, labels, left_padded, IGNORE_INDEX)
        return visual_token_hook(self.llm.model, hook, spans)

    def decode(self, generated: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.llm.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    # ---------------------------------------------------------- save & load
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The connector's full state plus every other trainable parameter (e.g. an unfrozen LLM), not copied."""
        others = {n: p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("connector.")}
        return {f"connector.{k}": v for k, v in self.connector.state_dict().items()} | others

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """:meth:`trainable_tensors`, detached, contiguous, on the CPU (what is saved)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.trainable_tensors().items()}

    def save(self, directory: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``vlm_config.json`` + ``trainable.safetensors`` atomically; ``VLM.load`` rebuilds it exactly.
        ``weights``: the trainable state to write instead of this model's own (a sharded model's, gathered whole)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = weights if weights is not None else self.trainable_state_dict()
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        with atomic_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.specs(), indent=2, sort_keys=True) + "\n")
        write_manifest(directory, [WEIGHTS_NAME, CONFIG_NAME])
        # the same adapters in peft's own format, for the tools that read it (a sharded model's checkpoints hold them
        # in trainable.safetensors only: peft reads the model's own, sharded, tensors)
        if self.llm.lora is not None and weights is None:
            with atomic_path(directory / ADAPTER_DIR) as tmp:
                self.llm.save_adapter(tmp)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        allow_dotted_paths: bool = False,
        verify: bool = True,
        weights: bool = True,
        **overrides: Any,
    ) -> VLM:
        """The one way to rebuild a saved model, from either format a directory may hold:

        - a run directory (``bench run``, ``VLM.save``): ``vlm_config.json`` + ``trainable.safetensors``, both checked
          against the directory's manifest (SHA-256) unless ``verify`` is False: the config decides what is built,
          so an edited one is refused like edited weights;
        - a transformers directory (``<run>/hf``, ``save_pretrained``): ``config.json`` (``model_type``
          ``connector_zoo``) + safetensors shards; backbones embedded as ``encoder/`` and ``llm/`` are read there.

        The config names only registered components unless ``allow_dotted_paths`` (a dotted path imports code chosen
        by whoever wrote the directory). ``weights=False`` gives the untrained model the config describes (``bench
        eval`` answers blind with it first); ``overrides`` replace parts of the config (tests)."""
        directory = Path(directory)
        specs, source = cls._saved_specs(directory, verify)
        for key, value in overrides.items():
            specs[key] = {**specs[key], **value} if isinstance(value, dict) else value
        with names_from_file(source, allow_dotted_paths):
            model = cls.build(
                specs["encoder"], specs["connector"], specs["llm"], specs.get("max_length"), specs.get("tiling")
            )
        if weights:
            model.load_weights(directory, verify=verify and source.name == CONFIG_NAME)
        return model

    @staticmethod
    def _saved_specs(directory: Path, verify: bool) -> tuple[dict[str, Any], Path]:
        """(component specs, the file they came from) of a run or transformers directory."""
        run_config, hf_config = directory / CONFIG_NAME, directory / HF_CONFIG_NAME
        if run_config.exists():
            source = run_config
            if verify:
                verify_file(run_config)
            specs = read_json(run_config)
        elif hf_config.exists():
            source = hf_config
            saved = read_json(hf_config)
            model_type = saved.get("model_type") if isinstance(saved, dict) else type(saved).__name__
            if model_type != "connector_zoo":
                raise ValueError(f"{hf_config} is not a connector-zoo model (model_type {model_type!r})")
            specs = {k: saved.get(k) for k in ("encoder", "connector", "llm", "tiling")} | {
                "max_length": saved.get("context_budget")
            }
            for part in ("encoder", "llm"):  # embedded backbones: sub-checkpoints inside the directory
                embedded = isinstance(specs[part], dict) and specs[part].get("checkpoint") == part
                if embedded and (directory / part).is_dir():
                    specs[part] = {**specs[part], "checkpoint": str(directory / part)}
        else:
            raise FileNotFoundError(
                f"{directory} holds neither {CONFIG_NAME} (a run) nor {HF_CONFIG_NAME} (a transformers directory)"
            )
        named = lambda k: isinstance(specs.get(k), dict) and isinstance(specs[k].get("name"), str)  # noqa: E731
        if not isinstance(specs, dict) or not all(named(k) for k in ("encoder", "connector", "llm")):
            raise ValueError(f"{source} is not a model config: it needs encoder, connector and llm objects with a name")
        return specs, source

    def load_connector(self, run_dir: str | Path, verify: bool = True) -> None:
        """Initialise the connector from another run's weights (LLaVA's stage 2 starts from stage 1's projector)."""
        path = Path(run_dir) / WEIGHTS_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: --init-connector needs a finished run directory")
        if verify:
            verify_file(path)
        state = {k[len("connector.") :]: v for k, v in load_file(str(path)).items() if k.startswith("connector.")}
        try:
            self.connector.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"the connector in {path} does not fit this model's connector "
                f"{self.connector.spec}: {str(err).splitlines()[0]} ..."
            ) from err

    def load_weights(self, directory: str | Path, verify: bool = True) -> None:
        """Load the trained weights a directory holds (``trainable.safetensors`` of a run or a checkpoint, checked
        against its manifest unless ``verify`` is False; or a transformers directory's shards)."""
        directory = Path(directory)
        if (directory / WEIGHTS_NAME).exists():
            files = [directory / WEIGHTS_NAME]
            if verify:
                verify_file(files[0])
        elif (directory / HF_INDEX_NAME).exists():
            files = [directory / f for f in sorted(set(read_json(directory / HF_INDEX_NAME)["weight_map"].values()))]
        elif (directory / HF_WEIGHTS_NAME).exists():
            files = [directory / HF_WEIGHTS_NAME]
        else:
            raise FileNotFoundError(f"{directory} has no trained weights ({WEIGHTS_NAME} or {HF_WEIGHTS_NAME})")
        state: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                state.update(load_file(str(path)))
            except Exception as err:
                raise ValueError(
                    f"{path} is not a readable safetensors file ({err}); it is corrupt or incomplete"
                ) from err
        self.load_trainable_state(state, directory)

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str | Path) -> None:
        """Load saved trained weights after checking that they fit (no unknown name, the whole connector, every
        shape); fp32 weights of a half-precision backbone stay fp32 (the trained master weights)."""
        own = dict(self.named_parameters()) | {f"connector.{k}": v for k, v in self.connector.state_dict().items()}
        unknown = sorted(set(state) - set(own))
        missing = sorted(k for k in own if k.startswith("connector.") and k not in state)
        wrong = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if unknown or missing or wrong:
            raise ValueError(
                f"{source} does not fit this model (built from its config): unknown {unknown[:5]}, "
                f"missing {missing[:5]}, wrong shape {wrong[:5]}"
            )
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            for k, v in state.items():
                if isinstance(own[k], DTensor):  # a sharded model (FSDP2): this process's shard of the full value
                    copy_full_into(own[k], v)
                elif own[k].dtype != v.dtype and v.dtype == torch.float32 and isinstance(own[k], nn.Parameter):
                    own[k].data = v.to(own[k].device)  # trained fp32 master weights stay fp32 in a half backbone
                else:
                    own[k].copy_(v)


def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a sharded parameter (FSDP2's DTensor): this process's shard of it. Every process holds
    ``value`` whole (read from the same file), so no communication happens."""
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
    target.to_local().copy_(local.to_local())


def llm_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LLM's entries of a VLM's trainable state, named as in the LLM's own model (``llm.model.`` removed)."""
    prefix = "llm.model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def pack_layout(lengths: list[int], width: int | None = None) -> list[tuple[int, int]]:
    """``(row, start)`` of each sample when samples of these lengths are packed: first-fit in decreasing length into
    rows as wide as the longest one, or ``width`` when that is wider (by default a row never costs more than one
    unpacked row of the same batch; the longest samples open the rows and the short ones fill their tails).
    Deterministic: equal lengths keep their order."""
    width = max(max(lengths), width or 0)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[int] = []  # room left per row
    out: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            free.append(width)
            row = len(free) - 1
        out[i] = (row, width - free[row])
        free[row] -= lengths[i]
    return out
