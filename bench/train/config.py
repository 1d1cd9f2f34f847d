"""A run's configuration: the named recipes, ``RunConfig`` (every field checked), the data it reads, the model it
builds, and the feature sources (cache and collator per image table) its stages and evaluation read."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.data.features import FeatureCache, decide
from bench.data.formats import BadSample, Dataset, hf_messages, llava_json, world_dataset
from bench.data.images import DEFAULT_MAX_PIXELS
from bench.data.loader import Collator
from bench.data.world import World, WorldConfig
from bench.train.pretrain import pretrain_encoder, steps
from bench.train.recipes import RECIPES
from bench.train.stage import StageConfig
from bench.train.tracking import TRACKERS
from bench.train.world_llm import pretrain_llm
from connector_zoo.io import read_json
from connector_zoo.model.precision import TORCH_NAMES
from connector_zoo.model.vlm import VLM
from connector_zoo.registry import RegistryError
from connector_zoo.settings import SettingError, check, check_choice
from connectors import CONNECTORS, build_connector


@dataclass
class RunConfig:
    encoder: dict[str, Any] = field(default_factory=lambda: {"name": "clip"})
    connector: dict[str, Any] = field(default_factory=lambda: {"name": "qformer"})
    llm: dict[str, Any] = field(default_factory=lambda: {"name": "tinyllama"})
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "world"})
    recipe: str = "mini"
    stages: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    precision: str = "auto"
    #: storage dtype of the frozen encoder / LLM weights (auto: the precision's dtype on GPU, fp32 on CPU)
    backbone_dtype: str = "auto"
    #: None keeps each stage's recipe setting
    gradient_checkpointing: bool | None = None
    #: LoRA on the LLM in every stage that trains it ({"r", "alpha", "dropout", "targets"}); None keeps the recipe's
    lora: dict[str, Any] | None = None
    #: QLoRA: the LLM's base weights in 4-bit NF4 (bitsandbytes, CUDA only)
    qlora: bool = False
    #: a finished run whose connector weights start this run (LLaVA's stage 2 from stage 1's projector)
    init_connector: str | None = None
    #: measure efficiency (FLOPs, latency, decode speed) after training; None: on for the mini world only
    profile: bool | None = None
    #: the frozen encoder's features: "on" (stored in the encoder's dtype, filled as batches need them, reused across
    #: epochs, runs and connectors), "off" (encoded online every batch), "auto" (on when they fit the limit)
    feature_cache: str = "auto"
    #: auto's size limit in GB (None: half the free disk where the cache lives)
    feature_cache_max_gb: float | None = None
    #: data-loader worker processes (None: one per CPU core but one, at most 8)
    num_workers: int | None = None
    max_length: int | None = None
    eval_limit: int | None = 1000  # questions per evaluation split (None: all; 0: no evaluation)
    strict: bool = False
    #: LLaVA JSON: image paths may resolve (symbolic links followed) outside the image folder
    allow_paths_outside_image_folder: bool = False
    #: images with more pixels are skipped before decoding (0: no limit); Pillow's decompression-bomb limit
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    #: experiment trackers the run logs to (tensorboard, wandb, mlflow, trackio; bench/train/tracking.py)
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Types and ranges, whether the values came from the command line or a run's config.json."""
        for name in ("encoder", "connector", "llm", "data"):
            check("run config", name, getattr(self, name), dict)
        for name in ("encoder", "connector", "llm"):
            check("run config", f"{name}.name", getattr(self, name).get("name"), str)
        check("run config", "recipe", self.recipe, str)
        check("run config", "stages", self.stages, list)
        for s in self.stages:
            check("run config", "stages[]", s, dict)
        check("run config", "seed", self.seed, int, lo=0)
        check_choice("run config", "precision", self.precision, ("auto", "no", "fp32", "bf16", "fp16"))
        check_choice("run config", "backbone_dtype", self.backbone_dtype, ("auto", "fp32", "bf16", "fp16"))
        for name in ("gradient_checkpointing", "profile"):
            check("run config", name, getattr(self, name), bool, optional=True)
        for name in ("qlora", "strict", "allow_paths_outside_image_folder"):
            check("run config", name, getattr(self, name), bool)
        check("run config", "lora", self.lora, dict, optional=True)
        check("run config", "init_connector", self.init_connector, str, optional=True)
        check_choice("run config", "feature_cache", self.feature_cache, ("auto", "on", "off"))
        check("run config", "feature_cache_max_gb", self.feature_cache_max_gb, float, lo=0, optional=True)
        check("run config", "num_workers", self.num_workers, int, lo=0, optional=True)
        check("run config", "max_length", self.max_length, int, lo=1, optional=True)
        check("run config", "eval_limit", self.eval_limit, int, lo=0, optional=True)
        check("run config", "max_image_pixels", self.max_image_pixels, int, lo=0)
        check("run config", "report_to", self.report_to, list)
        for name in self.report_to:
            check_choice("run config", "report_to[]", name, TRACKERS)

    @classmethod
    def plain_fields(cls) -> list[str]:
        """The settings given as they are by one command-line flag each (``--seed`` -> ``seed``); the others are
        assembled from several flags (the component specs, ``data``, ``stages``, ``lora``) or parsed
        (``eval_limit``, ``report_to``)."""
        structured = {"encoder", "connector", "llm", "data", "stages", "lora", "eval_limit", "report_to"}
        return [f.name for f in dataclasses.fields(cls) if f.name not in structured]

    @classmethod
    def from_file(cls, path: Path) -> RunConfig:
        """A run's ``config.json``, every field checked; an unknown field is named, not a traceback."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a run config (a JSON object)")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown run settings {unknown}; written by another version of connector-zoo?")
        try:
            return cls(**data)
        except SettingError as err:
            raise SettingError(f"{path}: {err}") from None

    def yaml_text(self) -> str:
        """The run's ``config.yaml``: its settings in the form ``bench run --config`` reads (keys are ``bench run``'s
        options; null settings left out; the recipe's stages written out, so the file trains the same run even if the
        named recipe changes later)."""
        import yaml  # (PyYAML: a core dependency; imported where a file is written)

        fields = dataclasses.asdict(self)
        fields["stages"] = [dict(s) for s in (self.stages or RECIPES.get(self.recipe, []))]
        if fields["eval_limit"] is None:
            fields["eval_limit"] = "all"  # the flag's word for None (a missing key would mean the default, 1000)
        body = {k: v for k, v in fields.items() if v is not None}
        header = (
            "# connector-zoo run settings: `bench run --config <this file> --out NEW` trains this run again\n"
            "# (keys are bench run's options, as in `bench run --help`; flags given beside --config override them)\n"
        )
        return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)

    def resolved_stages(self) -> list[StageConfig]:
        if self.recipe not in RECIPES and not self.stages:
            raise ValueError(f"unknown recipe {self.recipe!r}; available: {', '.join(RECIPES)}")
        known = {f.name for f in dataclasses.fields(StageConfig)}
        for s in self.stages or RECIPES[self.recipe]:
            if set(s) - known:
                raise SettingError(f"stage settings {sorted(set(s) - known)} are unknown; known: {', '.join(known)}")
        stages = [StageConfig(**s) for s in (self.stages or RECIPES[self.recipe])]
        for s in stages:
            if self.gradient_checkpointing is not None:
                s.gradient_checkpointing = self.gradient_checkpointing
            if self.lora is not None and s.stage >= 2:
                s.lora = self.lora
        return stages


# ------------------------------------------------------------------ pieces
def load_data(cfg: RunConfig, log) -> tuple[Dataset, Dataset | None, dict[str, Dataset], Any]:
    """(train, val, eval splits by name, world or None)."""
    data = cfg.data
    kind = data.get("kind", "world")
    if kind == "world":
        world = World(WorldConfig(**data.get("world", {})))
        return (
            world_dataset(world, "train", qa_turns=data.get("qa_turns", 1)),  # evaluation: one question a sample
            world_dataset(world, "val"),
            {"test": world_dataset(world, "test"), "compositional": world_dataset(world, "compositional")},
            world,
        )
    if kind == "llava":
        if not data.get("image_folder"):
            raise ValueError("LLaVA JSON data needs an image folder (--image-folder)")
        full = llava_json(data["path"], data["image_folder"], cfg.strict, cfg.allow_paths_outside_image_folder)
    elif kind == "hf":
        full = hf_messages(data["path"], data.get("split", "train"), strict=cfg.strict)
    else:
        raise ValueError(f"unknown data kind {kind!r}; use world, llava or hf")
    full.images.max_pixels = cfg.max_image_pixels or None
    if len(full.samples) < 2:
        why = "; ".join(f"{s['id']}: {s['reason']}" for s in full.skipped[:3])
        raise ValueError(
            f"{data['path']}: {len(full.samples)} usable sample(s), {len(full.skipped)} skipped"
            + (f" (first: {why})" if why else "")
            + "; a run needs at least 2 (training + held out)"
        )
    train, held = full.split(data.get("held_out", 0.05), seed=cfg.seed)
    drop_unreadable(held, cfg.eval_limit, cfg.strict, log)
    log(
        f"data: {len(train.samples)} training samples, {len(held.samples)} held out, "
        f"{len(full.skipped) + len(held.skipped)} skipped"
    )
    return train, held, {"heldout": held}, None


def drop_unreadable(data: Dataset, limit: int | None, strict: bool, log) -> None:
    """Decode the images of the first ``limit`` samples of an evaluation split now (threads), so that an unreadable
    one is skipped with its id and reason before any training, not found after it."""

    head = data.samples if limit is None else data.samples[:limit]
    images = sorted({s.image for s in head if s.image is not None})

    def check(i: int) -> str | None:
        try:
            data.images.load(i)
        except BadSample as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        bad = {i: why for i, why in zip(images, pool.map(check, images)) if why}
    for s in head:
        if s.image in bad:
            data.skip(s.id, bad[s.image], strict)
    data.samples[:] = [s for s in data.samples if s.image not in bad]
    if bad:
        log(f"data: {len(bad)} unreadable image(s) in {data.name} skipped before training")


def connector_spec(cfg: RunConfig) -> dict[str, Any]:
    """The connector's spec; on the mini world its ``small_settings`` (sized for the world's backbones) fill in
    what the run does not set."""
    spec = dict(cfg.connector)
    if cfg.data.get("kind", "world") == "world":
        spec = {**getattr(CONNECTORS.get(spec["name"]), "small_settings", {}), **spec}
    return spec


def check_connector_settings(cfg: RunConfig) -> None:
    """Build the connector on the meta device (no memory, no time) so a bad setting is reported before the data,
    the world or a 7B LLM is loaded. Only setting errors are raised here; anything else surfaces in the real build."""

    spec = connector_spec(cfg)
    if spec.get("init_from"):
        return  # reads a checkpoint: left to the real build
    try:
        with torch.device("meta"):
            build_connector(spec.pop("name"), 64, 64, **spec)
    except (SettingError, TypeError, RegistryError):
        raise
    except Exception:  # noqa: BLE001 (e.g. a plugin that cannot be built on the meta device)
        pass


def build_model(cfg: RunConfig, world, log, backbone_dtype: str = "fp32") -> VLM:
    enc_spec, llm_spec, conn_spec = dict(cfg.encoder), dict(cfg.llm), connector_spec(cfg)
    if backbone_dtype != "fp32":
        enc_spec.setdefault("dtype", TORCH_NAMES[backbone_dtype])
        llm_spec.setdefault("dtype", TORCH_NAMES[backbone_dtype])
    if cfg.qlora:
        llm_spec["quantization"] = "nf4"
    if world is not None:
        pre = cfg.data.get("pretrain", {})  # e.g. {"encoder_steps": 5, "llm_steps": 5} for micro worlds in tests
        if not enc_spec.get("checkpoint"):
            enc_spec["checkpoint"] = str(pretrain_encoder(enc_spec["name"], world, **steps(pre, "encoder"), log=log))
        if not llm_spec.get("checkpoint"):
            llm_spec["checkpoint"] = str(pretrain_llm(llm_spec["name"], world, **steps(pre, "llm"), log=log))
    torch.manual_seed(cfg.seed)
    vlm = VLM.build(enc_spec, conn_spec, llm_spec, cfg.max_length)
    log(
        f"model: {enc_spec['name']} + {conn_spec['name']} + {llm_spec['name']}  "
        f"(connector {vlm.connector.num_parameters():,} parameters)"
    )
    return vlm


def stage_samples(data: Dataset, which: str) -> Dataset:
    if which == "all":
        return data
    if which not in ("captions", "questions"):
        raise ValueError(f"stage data must be all, captions or questions, not {which!r}")
    keep = [s for s in data.samples if (s.meta.get("type") == "caption") == (which == "captions")]
    return Dataset(data.name, keep, data.images, data.skipped)


def feature_sources(cfg: RunConfig, vlm: VLM, datasets: list[Dataset | None], log):
    """A :class:`FeatureCache` and a :class:`Collator` per image table; the cache on or off as ``--feature-cache``
    says (auto: by the projected size), logged with the reason. Nothing is encoded here."""
    tables = {ds.images.key: ds.images for ds in datasets if ds is not None}
    attention = vlm.connector.feature_request
    on, why = decide(cfg.feature_cache, vlm.encoder, list(tables.values()), attention, cfg.feature_cache_max_gb)
    features: dict[str, FeatureCache] = {}
    for key, table in tables.items():  # the tables of one encoder share its directory and one open store
        shared = next(iter(features.values())).store if features else None
        features[key] = FeatureCache(vlm.encoder, table, attention, cached=on, store=shared)
    where = next(iter(features.values())).dir if features else None
    log(f"feature cache: {'on' if on else 'off'} ({why})" + (f", in {where}" if on else ""))
    budget = vlm.connector.max_tokens(vlm.encoder.info)
    collators = {k: Collator(vlm.llm, f, budget, vlm.max_length) for k, f in features.items()}
    return features, collators, {"mode": cfg.feature_cache, "on": on, "why": why, "dir": where and str(where)}
