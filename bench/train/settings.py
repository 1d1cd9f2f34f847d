"""A run's settings as data: what a run is (``RunConfig``, and ``StageConfig`` for each of its stages), typed and
range-checked, apart from what assembles it (``bench.train.assemble``: its data, model and feature sources; the
trainer). A setting travels from the command line or a configuration file into these classes and from them to the one
part that uses it. Nothing here imports torch, transformers or the model: ``RunConfig(...)`` is checked in
milliseconds, before any of them is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.train.recipes import RECIPES
from bench.train.tracking import TRACKERS
from connector_zoo.io import read_json
from connector_zoo.settings import PILLOW_MAX_IMAGE_PIXELS as DEFAULT_MAX_PIXELS
from connector_zoo.settings import SettingError, check, check_choice


@dataclass
class StageConfig:
    """One training stage: ``steps`` optimizer steps (0: none, the stage is skipped), or ``epochs`` over the data when
    ``steps`` is None. Every setting is range-checked on construction (recipes, ``--steps``, a run's config.json)."""

    stage: int = 1
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    #: when set, the accumulation is derived: global_batch = batch_size x grad_accum x processes (recipes of the
    #: papers name the global batch; the same recipe then holds on 1 GPU or 8)
    global_batch: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps between validation-loss checks (0: at the end only)
    #: held-out samples in each validation-loss check (the first N of the validation split); the loss picks
    #: ``checkpoint-best`` and goes into the history, never into a run's accuracy
    val_limit: int = 2000
    save_every: int = 100
    #: which samples this stage trains on: "all", or only "captions" / "questions" (mini world sample types)
    data: str = "all"
    #: sort the samples of each optimizer step by length, so micro-batches pad less (LLaVA's length grouping)
    group_by_length: bool = False
    #: recompute the LLM's activations in the backward pass (less memory, ~1/3 more compute); the LLM's own
    #: transformers gradient checkpointing, non-reentrant, so a frozen LLM still passes gradients to the connector
    gradient_checkpointing: bool = False
    #: the connector's learning rate when it differs from ``lr`` (LLaVA-1.5 LoRA: lr 2e-4, projector 2e-5), or
    #: "paper": the rate the connector's paper trains it with in this stage (``Connector.paper_lr``)
    connector_lr: float | str | None = None
    #: LoRA adapters on the LLM in a stage that trains it (``r``, ``alpha``, ``dropout``, ``targets``), or None
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        who = f"stage {self.stage}"
        check(who, "stage", self.stage, int, lo=1, hi=2)
        check(who, "steps", self.steps, int, lo=0, optional=True)
        check(who, "epochs", self.epochs, float, lo=0, lo_open=True)
        for name in ("batch_size", "grad_accum", "save_every"):
            check(who, name, getattr(self, name), int, lo=1)
        check(who, "global_batch", self.global_batch, int, lo=1, optional=True)
        check(who, "lr", self.lr, float, lo=0, lo_open=True)
        if self.connector_lr != "paper":
            check(who, "connector_lr", self.connector_lr, float, lo=0, lo_open=True, optional=True)
        check(who, "weight_decay", self.weight_decay, float, lo=0)
        check(who, "warmup_ratio", self.warmup_ratio, float, lo=0, hi=1)
        check(who, "min_lr_ratio", self.min_lr_ratio, float, lo=0, hi=1)
        check(who, "max_grad_norm", self.max_grad_norm, float, lo=0)
        check(who, "eval_every", self.eval_every, int, lo=0)
        check(who, "val_limit", self.val_limit, int, lo=1)
        check_choice(who, "data", self.data, ("all", "captions", "questions"))
        check(who, "group_by_length", self.group_by_length, bool)
        check(who, "gradient_checkpointing", self.gradient_checkpointing, bool)
        check(who, "lora", self.lora, dict, optional=True)

    def resolve_accumulation(self, num_processes: int) -> None:
        """Set ``grad_accum`` from ``global_batch`` for this number of processes (no-op when it is not set)."""
        if self.global_batch is None:
            return
        per_step = self.batch_size * num_processes
        if self.global_batch % per_step:
            raise ValueError(
                f"global batch {self.global_batch} is not a multiple of batch {self.batch_size} x {num_processes} "
                f"processes; choose a --batch-size that divides {self.global_batch // num_processes}"
            )
        self.grad_accum = self.global_batch // per_step


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
    #: sort each optimizer step's samples by length before cutting micro-batches (LLaVA's length grouping); None keeps
    #: each stage's recipe setting (on in llava-1.5-finetune*)
    group_by_length: bool | None = None
    #: LoRA on the LLM in every stage that trains it ({"r", "alpha", "dropout", "targets"}); None keeps the recipe's
    lora: dict[str, Any] | None = None
    #: QLoRA: the LLM's base weights in 4-bit NF4 (bitsandbytes, CUDA only)
    qlora: bool = False
    #: AnyRes tiling ({"name": "anyres", "grid_pinpoints": [[h, w], ...]}; connector_zoo/model/tiling.py), None: each
    #: image resized to the encoder's input
    tiling: dict[str, Any] | None = None
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
    #: several samples per row in training (no attention across them; VLM._pack): on, off, or auto (on for LLaVA / HF
    #: data, whose lengths vary; off for the mini world, whose samples are all about as long)
    packing: str = "auto"
    #: "full": FSDP2 over the processes in every stage that trains the LLM (bench/train/sharding.py); "none": replicated
    shard: str = "none"

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
        for name in ("gradient_checkpointing", "group_by_length", "profile"):
            check("run config", name, getattr(self, name), bool, optional=True)
        for name in ("qlora", "strict", "allow_paths_outside_image_folder"):
            check("run config", name, getattr(self, name), bool)
        check("run config", "lora", self.lora, dict, optional=True)
        check("run config", "tiling", self.tiling, dict, optional=True)
        check("run config", "init_connector", self.init_connector, str, optional=True)
        check_choice("run config", "feature_cache", self.feature_cache, ("auto", "on", "off"))
        check("run config", "feature_cache_max_gb", self.feature_cache_max_gb, float, lo=0, optional=True)
        check("run config", "num_workers", self.num_workers, int, lo=0, optional=True)
        check("run config", "max_length", self.max_length, int, lo=1, optional=True)
        check("run config", "eval_limit", self.eval_limit, int, lo=0, optional=True)
        check("run config", "max_image_pixels", self.max_image_pixels, int, lo=0)
        check_choice("run config", "packing", self.packing, ("auto", "on", "off"))
        check_choice("run config", "shard", self.shard, ("none", "full"))
        check("run config", "report_to", self.report_to, list)
        for name in self.report_to:
            check_choice("run config", "report_to[]", name, TRACKERS)

    @classmethod
    def plain_fields(cls) -> list[str]:
        """The settings given as they are by one command-line flag each (``--seed`` -> ``seed``); the others are
        assembled from several flags (the component specs, ``data``, ``stages``, ``lora``) or parsed
        (``eval_limit``, ``report_to``)."""
        structured = {"encoder", "connector", "llm", "data", "stages", "lora", "eval_limit", "report_to", "tiling"}
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
            if self.group_by_length is not None:
                s.group_by_length = self.group_by_length
            if self.lora is not None and s.stage >= 2:
                s.lora = self.lora
        return stages
