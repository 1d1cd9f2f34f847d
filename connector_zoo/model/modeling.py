"""Any encoder x connector x LLM as a transformers model: ``AutoModelForImageTextToText.from_pretrained(dir)``.

:class:`ConnectorZooConfig` (``model_type = "connector_zoo"``) holds the three component specs (name, checkpoint,
settings) and :class:`ConnectorZooForConditionalGeneration` (``PreTrainedModel`` + ``GenerationMixin``) wraps the
composed model it owns (:class:`~connector_zoo.model.vlm.VLM`; the VLM never refers back to it). Importing
``connector_zoo.model`` registers both with ``AutoConfig`` / ``AutoModelForImageTextToText``.

``save_pretrained(dir)`` writes ``config.json``, the trained weights (the connector and whatever else trained: a
fine-tuned LLM, LoRA adapters) as standard safetensors shards through transformers' own writer, and a model card.
The frozen backbones are **referenced** by their checkpoint (hub id, local path or preset) unless
``embed_backbones=True``, which writes them as ``encoder/`` and ``llm/`` sub-checkpoints (``save_pretrained`` of the
component's transformers model) and points the config there, so the directory stands alone. ``push_to_hub`` is the
standard one. ``from_pretrained`` rebuilds the components from the config and loads the saved weights over them;
a plugin connector recorded as a dotted path is imported only with ``allow_dotted_paths=True`` (it names code chosen
by whoever wrote the directory), otherwise the error says so.

``generate(input_ids=..., pixel_values=..., attention_mask=..., **generation_kwargs)`` takes prompts tokenized with
one ``<image>`` token each (``model.prompt_ids``) and the encoder's pixels (``model.preprocess``), splices the visual
tokens in and hands every standard generation argument to the LLM's ``generate``; it returns the new tokens.
``model.answer(images, prompts)`` does all of it for PIL images and strings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from connector_zoo.io import link_or_copy, link_tree, readable_as_usual
from connector_zoo.model.configuration import PARTS, ConnectorZooConfig
from connector_zoo.model.inputs import VLMInputs
from connector_zoo.model.processing import ConnectorZooProcessor, remember_encoder
from connector_zoo.model.vlm import VLM, WEIGHTS_NAME
from connector_zoo.registry import RegistryError


class ConnectorZooForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = ConnectorZooConfig
    base_model_prefix = "vlm"
    _no_split_modules: list[str] = []

    def __init__(self, config: ConnectorZooConfig, vlm=None):
        super().__init__(config)
        if vlm is None:
            specs = config.specs()
            vlm = VLM.build(
                specs["encoder"], specs["connector"], specs["llm"], specs["max_length"], specs.get("tiling")
            )
        self.vlm = vlm
        remember_encoder(vlm.encoder)  # the AutoProcessor of this directory preprocesses with it (no second copy)

    @classmethod
    def from_vlm(cls, vlm) -> ConnectorZooForConditionalGeneration:
        return cls(ConnectorZooConfig.from_specs(vlm.specs()), vlm=vlm)

    # ---------------------------------------------------------------- save & load
    def save_pretrained(
        self,
        save_directory,
        embed_backbones: bool = False,
        results: dict | None = None,
        settings: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Config + trained weights (shards) + model card (with a run's ``results`` when given, and its
        ``config.yaml`` ``settings``, written beside as ``run_config.yaml``); ``embed_backbones`` writes the backbones
        alongside."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        specs = json.loads(json.dumps(self.vlm.specs()))
        if embed_backbones:
            specs = self._embed(out, specs)
        state = self.vlm.trainable_state_dict()
        config = ConnectorZooConfig.from_specs(specs)
        config.architectures = [type(self).__name__]
        original, self.config = self.config, config
        try:
            super().save_pretrained(out, state_dict=state, **kwargs)
        finally:
            self.config = original
        self.processor(specs).save_pretrained(out)
        (out / "README.md").write_text(model_card(self.vlm, specs, results, settings))
        if settings:
            (out / RUN_SETTINGS_NAME).write_text(settings)
        for written in [*out.glob("*.safetensors"), out / "encoder", out / "llm"]:  # safetensors writes 0600
            if written.exists():
                readable_as_usual(written)

    def processor(self, specs: dict[str, Any] | None = None) -> ConnectorZooProcessor:
        """The :class:`~connector_zoo.model.processing.ConnectorZooProcessor` of this model (``AutoProcessor`` reads the
        one ``save_pretrained`` writes)."""
        return processor_of(self.vlm, specs or self.vlm.specs())

    def _embed(self, out: Path, specs: dict[str, Any]) -> dict[str, Any]:
        enc, llm = self.vlm.encoder, self.vlm.llm
        if hasattr(llm.model, "peft_config"):
            raise ValueError(
                "embed_backbones with LoRA adapters: merge them first (bench export-hf merges), or save "
                "with the backbones referenced"
            )
        enc.save_checkpoint(out / "encoder")
        llm.model.save_pretrained(out / "llm")
        llm.tokenizer.save_pretrained(out / "llm")
        specs["encoder"] = {**specs["encoder"], "checkpoint": "encoder"}
        specs["llm"] = {**specs["llm"], "checkpoint": "llm"}
        return specs

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args: Any, allow_dotted_paths: bool = False, **kwargs: Any
    ) -> ConnectorZooForConditionalGeneration:
        """Rebuild from ``config.json`` (sub-checkpoints ``encoder``/``llm`` resolved inside the directory), then
        load the saved weights; every saved tensor must find its parameter."""
        directory = Path(pretrained_model_name_or_path)
        if not (directory / "config.json").exists():
            directory = Path(snapshot_download(str(pretrained_model_name_or_path)))
        config = ConnectorZooConfig.from_pretrained(directory)
        try:  # the one loader (VLM.load): a transformers directory has no manifest to check against
            vlm = VLM.load(directory, allow_dotted_paths=allow_dotted_paths, verify=False)
        except RegistryError as err:
            if "--allow-dotted-paths" not in str(err):
                raise
            fix = "pass allow_dotted_paths=True to from_pretrained (the code must be importable)"
            raise RegistryError(str(err).replace("pass --allow-dotted-paths", fix)) from None
        model = cls(config, vlm=vlm)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype not in (None, "auto"):  # as transformers does: every floating weight in that dtype
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        device_map = kwargs.get("device_map")
        if device_map is not None:
            if isinstance(device_map, dict) or device_map in ("balanced", "balanced_low_0", "sequential"):
                raise ValueError(
                    f"device_map={device_map!r}: a connector-zoo model loads on one device; pass a "
                    f"device (e.g. 'cuda:0'), or 'auto' for the first GPU if there is one"
                )
            model.to(("cuda" if torch.cuda.is_available() else "cpu") if device_map == "auto" else device_map)
        return model.eval()

    # ---------------------------------------------------------------- compute
    def preprocess(self, images):
        """Pixel values of PIL images (with tiling: a row per view; ``self.vlm.preprocess`` gives the image sizes
        too)."""
        return self.vlm.preprocess(images)[0]

    def prompt_ids(self, prompts: list[str], with_image: list[bool] | None = None) -> list[torch.Tensor]:
        return self.vlm.prompt_ids(with_image or [True] * len(prompts), prompts)

    def _inputs(self, input_ids, attention_mask, pixel_values, labels=None, image_sizes=None):
        rows = list(input_ids) if not isinstance(input_ids, torch.Tensor) or input_ids.dim() == 2 else [input_ids]
        if attention_mask is not None:  # unpad (either side): the composed model re-pads after splicing
            rows = [r[m.bool()] for r, m in zip(rows, attention_mask)]
        image_id = self.vlm.llm.image_token_id
        has_image = [bool((r == image_id).any()) for r in rows]
        label_rows = None
        if labels is not None:
            label_rows = (
                [lab[m.bool()] for lab, m in zip(labels, attention_mask)]
                if attention_mask is not None
                else list(labels)
            )
        sizes = None if image_sizes is None else [tuple(int(x) for x in s) for s in image_sizes]
        return VLMInputs(rows, label_rows, pixel_values=pixel_values, has_image=has_image, image_sizes=sizes)

    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, image_sizes=None, **kwargs: Any
    ):
        out = self.vlm(self._inputs(input_ids, attention_mask, pixel_values, labels, image_sizes), full_logits=True)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    @torch.no_grad()
    def generate(
        self, input_ids=None, pixel_values=None, attention_mask=None, image_sizes=None, **generation_kwargs: Any
    ):
        max_new = generation_kwargs.pop("max_new_tokens", 32)
        return self.vlm.generate_ids(
            self._inputs(input_ids, attention_mask, pixel_values, image_sizes=image_sizes), max_new, **generation_kwargs
        )

    def answer(self, images, prompts: list[str], **generation_kwargs: Any) -> list[str]:
        return self.vlm.generate(images, prompts, **generation_kwargs)


def write_run_model(vlm, run_dir: Path, results: dict[str, Any] | None) -> Path:
    """A run's model in this format, ``<run>/hf``: config, generation config, processor, model card, and the run's
    trained weights hard-linked (not copied: a fine-tuned 7B LLM is not written twice) as ``model.safetensors``.

    The directory stands alone: a backbone loaded from a local directory (the mini world's, built in this machine's
    cache; a checkpoint on disk) is hard-linked into ``encoder/`` or ``llm/`` and the config names it there, so a copy
    of ``hf/`` loads on another path or machine; a hub id stays a reference. Written beside and renamed into place,
    so a reader never sees half of it, with the usual permissions (readable by others as the umask allows)."""
    run_dir = Path(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=run_dir))
    try:
        specs = json.loads(json.dumps(vlm.specs()))
        for part in ("encoder", "llm"):
            checkpoint = specs[part].get("checkpoint")
            if isinstance(checkpoint, str) and checkpoint not in ("encoder", "llm") and Path(checkpoint).is_dir():
                link_tree(checkpoint, tmp / part)
                specs[part] = {**specs[part], "checkpoint": part}
        config = ConnectorZooConfig.from_specs(specs)
        config.architectures = [ConnectorZooForConditionalGeneration.__name__]
        config.save_pretrained(tmp)
        GenerationConfig(eos_token_id=vlm.llm.eos_token_id, pad_token_id=vlm.llm.pad_token_id).save_pretrained(tmp)
        link_or_copy(run_dir / WEIGHTS_NAME, tmp / "model.safetensors")
        processor_of(vlm, specs).save_pretrained(tmp)  # AutoProcessor, pipeline("image-text-to-text")
        settings = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else None
        (tmp / "README.md").write_text(model_card(vlm, specs, results, settings))
        if settings:
            (tmp / RUN_SETTINGS_NAME).write_text(settings)
        readable_as_usual(tmp)
        shutil.rmtree(run_dir / "hf", ignore_errors=True)
        os.rename(tmp, run_dir / "hf")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_dir / "hf"


def processor_of(vlm, specs: dict[str, Any]) -> ConnectorZooProcessor:
    """The processor of ``vlm`` as saved with ``specs`` (an embedded encoder is named by its folder)."""
    processor = ConnectorZooProcessor.from_vlm(vlm)
    processor.image_processor.encoder = specs["encoder"]
    return processor


#: a run's settings beside its model card: ``bench run --config run_config.yaml`` trains it again
RUN_SETTINGS_NAME = "run_config.yaml"


def model_card(vlm, specs: dict[str, Any], results: dict[str, Any] | None, settings: str | None = None) -> str:
    """README.md, the page the Hub shows: components, parameters and, for a run, its recipe (stage by stage), data,
    evaluation by question type beside the blind baseline, what it cost, and the command and settings that train it
    again (``settings``: the run's ``config.yaml``)."""
    enc, conn, llm = (specs[p] for p in PARTS)
    trainable = sum(t.numel() for t in vlm.trainable_tensors().values())
    header = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    header.append(f"tags: [connector-zoo, {conn['name']}]")
    base = llm.get("checkpoint")
    if isinstance(base, str) and hub_id(base):
        header.append(f"base_model: {base}")
    lines = [
        *header,
        "---",
        "",
        f"# {conn['name']} connector: {enc['name']} -> {llm['name']}",
        "",
        "Trained with [connector-zoo](https://github.com/connector-zoo/connector-zoo). Load with "
        "`import connector_zoo.model` and `AutoModelForImageTextToText.from_pretrained(<this directory>)`.",
        "",
        "## Components",
        "",
        "| part | spec |",
        "| --- | --- |",
    ]
    lines += [f"| {p} | `{json.dumps(specs[p], sort_keys=True)}` |" for p in PARTS]
    where = "embedded" if enc.get("checkpoint") == "encoder" else "referenced"
    total = sum(p.numel() for p in vlm.parameters())
    lines += ["", f"Parameters: {total:,} in all, {trainable:,} trained and saved here; the backbones are {where}.", ""]
    if results:
        lines += run_sections(results)
    if settings:
        lines += [
            "## Reproduce",
            "",
            f"With connector-zoo installed, `{RUN_SETTINGS_NAME}` (beside this card) trains this model again:",
            "",
            "```bash",
            f"bench run --config {RUN_SETTINGS_NAME} --out runs/again",
            "```",
            "",
            "```yaml",
            settings.rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def hub_id(checkpoint: str) -> bool:
    """``org/name`` that is not a path on this machine (a hub id, for the card's ``base_model``)."""
    parts = checkpoint.split("/")
    return len(parts) == 2 and all(parts) and not Path(checkpoint).exists() and not checkpoint.startswith(".")


def run_sections(results: dict[str, Any]) -> list[str]:
    """The card's training and evaluation sections from a run's ``results.json``."""
    cfg = results.get("config", {})
    tokens = (results.get("visual_tokens_per_image") or {}).get("mean")
    lines = [
        "## Training",
        "",
        f"Recipe `{cfg.get('recipe')}`, seed {cfg.get('seed')}; data: {describe_data(cfg.get('data', {}))}; visual "
        f"tokens per image: {tokens}.",
        "",
    ]
    stages = results.get("training") or []
    if stages:
        lines += [
            "| stage | steps | final loss | samples/s | trainable parameters |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for i, st in enumerate(stages, start=1):
            loss = st.get("final_loss")
            lines.append(
                f"| {i} | {st.get('steps')} | {'n/a' if loss is None else f'{loss:.4f}'} | "
                f"{st.get('train_samples_per_second', 0):.1f} | {st.get('trainable_parameters', 0):,} |"
            )
        lines.append("")
    precision = results.get("precision") or {}
    versions = results.get("versions") or {}
    cost = [f"wall time {results['wall_time_seconds']:.0f} s"] if results.get("wall_time_seconds") is not None else []
    if precision:
        compute = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(precision.get("compute"))
        cost.append(f"compute {compute}, frozen weights in {precision.get('backbone')}")
    if versions:
        cost.append(", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers") if k in versions))
    if results.get("git_commit"):
        cost.append(f"connector-zoo commit `{results['git_commit']}`")
    if cost:
        lines += ["; ".join(cost) + ".", ""]
    metrics = results.get("metrics") or {}
    kinds = sorted({k for m in metrics.values() if m and "accuracy" in m for k in m["accuracy"].get("per_type", {})})
    lines += [
        "## Evaluation",
        "",
        "Exact match per split and question type; blind: the same LLM without the image (before training).",
        "",
        "| split | questions | exact match | blind | " + " | ".join(kinds) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |",
    ]
    for split, m in metrics.items():
        if not m or "accuracy" not in m:
            lines.append(f"| {split} | 0 | not evaluated | | " + " | ".join("" for _ in kinds) + " |")
            continue
        acc, per = m["accuracy"], m["accuracy"].get("per_type", {})
        cells = " | ".join(f"{per[k]:.3f}" if k in per else "" for k in kinds)
        lines.append(
            f"| {split} | {acc.get('count')} | {acc['exact_match']:.3f} | {m['blind']['exact_match']:.3f} | {cells} |"
        )
    for task, entry in (results.get("lmms_eval") or {}).items():
        value = entry["metrics"].get(entry.get("headline"), float("nan"))
        lines.append(
            f"| lmms-eval {task} ({entry.get('headline')}) | | {value:.3f} | | " + " | ".join("" for _ in kinds) + " |"
        )
    return [*lines, ""]


def describe_data(data: dict[str, Any]) -> str:
    kind = data.get("kind", "world")
    if kind == "world":
        world = data.get("world") or {}
        size = f", {world['train']:,} training images of {world['image_size']} px" if "train" in world else ""
        fresh = f", {data['train_questions']} fresh questions a training image" if data.get("train_questions") else ""
        return f"the embedded mini world{size}{fresh}" + (
            f", {data['qa_turns']} questions a {'sample, each asked alone' if data.get('qa_branches') else 'turn'}"
            if data.get("qa_turns")
            else ""
        )
    if kind == "llava":
        return f"LLaVA JSON `{data.get('path')}` (images in `{data.get('image_folder')}`)"
    return f"Hugging Face dataset `{data.get('path')}`"
