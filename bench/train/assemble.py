"""Assembling a run from its settings (``bench.train.settings.RunConfig``): the data it reads, the model it builds, and
the feature sources (cache and collator per image table) its stages and evaluation read."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from bench.data.features import FeatureCache, decide
from bench.data.formats import BadSample, Dataset, hf_messages, llava_json, world_dataset
from bench.data.loader import Collator
from bench.data.world import World, WorldConfig
from bench.train.pretrain import pretrain_encoder, steps
from bench.train.settings import RunConfig
from bench.train.world_llm import pretrain_llm
from connector_zoo.model.precision import TORCH_NAMES
from connector_zoo.model.vlm import VLM
from connector_zoo.registry import RegistryError
from connector_zoo.settings import SettingError
from connectors import CONNECTORS, build_connector


# ------------------------------------------------------------------ pieces
def load_data(cfg: RunConfig, log) -> tuple[Dataset, Dataset | None, dict[str, Dataset], Any]:
    """(train, val, eval splits by name, world or None)."""
    data = cfg.data
    kind = data.get("kind", "world")
    if kind == "world":
        world = World(WorldConfig(**data.get("world", {})))
        return (
            world_dataset(  # evaluation: one question a sample, the world's recorded ones
                world,
                "train",
                qa_turns=data.get("qa_turns", 1),
                fresh_questions=data.get("train_questions"),
                branches=data.get("qa_branches", False),
            ),
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
    vlm = VLM.build(enc_spec, conn_spec, llm_spec, cfg.max_length, cfg.tiling)
    tiles = ""
    if vlm.tiling is not None:
        points = ",".join(f"{h}x{w}" for h, w in vlm.tiling.geometry.pinpoints)
        layout = "grid, unpadded, newline per row" if vlm.tiling.image_newline is not None else "views concatenated"
        tiles = f"; AnyRes tiling at {points} ({layout}), at most {vlm.max_visual_tokens():,} visual tokens an image"
    log(
        f"model: {enc_spec['name']} + {conn_spec['name']} + {llm_spec['name']}  "
        f"(connector {vlm.connector.num_parameters():,} parameters{tiles})"
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
    geometry = vlm.tiling.geometry if vlm.tiling is not None else None
    views = geometry.max_views if geometry is not None else 1
    on, why = decide(
        cfg.feature_cache, vlm.encoder, list(tables.values()), attention, cfg.feature_cache_max_gb, views=views
    )
    features: dict[str, FeatureCache] = {}
    for key, table in tables.items():  # the tables of one encoder share its directory and one open store
        shared = next(iter(features.values())).store if features else None
        features[key] = FeatureCache(vlm.encoder, table, attention, cached=on, store=shared, tiling=geometry)
    where = next(iter(features.values())).dir if features else None
    log(f"feature cache: {'on' if on else 'off'} ({why})" + (f", in {where}" if on else ""))
    budget = vlm.max_visual_tokens()
    collators = {k: Collator(vlm.llm, f, budget, vlm.max_length) for k, f in features.items()}
    return features, collators, {"mode": cfg.feature_cache, "on": on, "why": why, "dir": where and str(where)}


#: the mini world's LLM levels that train on packed rows under ``--packing auto``: the pretrained level (30 layers
#: of width 576: a step of 16 samples padded 13.2 % took 6.85 s, packed 6.39 s; AMD EPYC, 2 threads, December 7).
#: The from-scratch levels keep padded rows, and with them every record made on them.
PACKED_LEVELS = ("smollm2",)


def packing_decision(cfg: RunConfig, vlm: VLM) -> tuple[bool, str]:
    """Whether training rows hold several samples, and why. ``auto``: on for LLaVA / HF data (short answers beside
    long conversations and text-only samples: a padded batch computes much padding) and the pretrained world level
    (PACKED_LEVELS), off for the from-scratch world levels (their samples are about as long, their model narrow). A
    connector that prunes inside the LLM (FastV) works row by row: off for it, and ``on`` is refused."""
    inside_llm = getattr(vlm.connector, "llm_hook", None) is not None
    if cfg.data.get("qa_branches"):  # a sample of branches is told apart by its position ids: packed rows only
        if cfg.packing == "off" or inside_llm:
            why = "--packing off" if cfg.packing == "off" else f"{vlm.connector.registered_name} prunes inside the LLM"
            raise ValueError(f"--qa-branches trains on packed rows, and {why}: drop one of them")
        return True, "--qa-branches: its samples train on packed rows"
    if cfg.packing == "on":
        if inside_llm:
            raise ValueError(
                f"--packing on: {vlm.connector.registered_name} prunes visual tokens inside the LLM, one image per "
                "row; use --packing off"
            )
        return True, "--packing on"
    if cfg.packing == "off":
        return False, "--packing off"
    if inside_llm:
        return False, f"auto: {vlm.connector.registered_name} prunes inside the LLM, one image per row"
    if cfg.data.get("kind", "world") == "world":
        if cfg.data.get("pretrain", {}).get("llm_level", "small") in PACKED_LEVELS:
            return True, (
                "auto: the pretrained level's batches are about 13 % padding, and one packed row trains a step 1.07x "
                "faster (benchmarks/world_levers.py)"
            )
        return False, "auto: the mini world's samples are all about as long"
    return True, "auto: LLaVA / HF data, whose lengths vary"
