"""The training-free pruning curve (FasterVLM's setting): a trained ``linear``/``mlpNx_gelu`` run evaluated with a
token reducer in front of its projector at several keep ratios, with no retraining, next to its baselines:

- ``cls_prune``: the top-k patches by CLS attention (the method);
- ``random_keep``: k patches at random (mean and std over ``seeds`` draws): does the score beat chance?
- ``avgpool``: the grid average-pooled to about k tokens (round(side * sqrt(ratio)) per side): does keeping a subset
  beat merging everything spatially?
- ``visionzip``: k tokens split as VisionZip's 54 : 10 (dominant with CLS : contextual);
- ``prumerge``: PruMerge with a fixed ratio (``adaptive=False``): int(k) kept and merged + 1 pooled token;
- ``fastv``: every token enters the LLM, k are left after LLM layer K (R = 1 - ratio): the paper's K = 2, or K = 1
  where the LLM has only 2 layers (the from-scratch world LLMs).

Every point, the unpruned reference included, is evaluated on the same cached features (computed with the encoder's
eager attention, which pruning needs), so the 100 % points of cls_prune and random_keep equal the unpruned accuracy
exactly. Prefill time is measured for the cls_prune points (interleaved rounds); it depends on the token count only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.data.features import FeatureCache
from bench.data.loader import Collator
from bench.evaluate.accuracy import accuracy, answer, qa_samples
from bench.evaluate.profile import REDUCERS as METHODS
from bench.evaluate.profile import interleaved_samples, prefill_fn, reducer_at, tokens_after
from bench.train.assemble import load_data
from bench.train.settings import RunConfig
from connector_zoo.model.precision import autocast, run_precision
from connector_zoo.model.vlm import VLM, VLMInputs
from connectors.base import PerTokenConnector
from connectors.cls_prune import CLSPrune
from connectors.fastv import FastV
from encoders.base import FeatureRequest


def pruning_curve(
    run_dir: Path,
    ratios: list[float],
    eval_limit: int | None = 1000,
    allow_dotted_paths: bool = False,
    verify: bool = True,
    seeds: tuple[int, ...] = (0, 1, 2),
    methods: tuple[str, ...] = METHODS,
) -> list[dict[str, Any]]:
    """One row per (method, keep ratio): tokens, accuracy (random_keep: mean over seeds, with its std), accuracy
    retained against the unpruned model, and for cls_prune the measured prefill speed-up."""
    cfg = RunConfig.from_file(run_dir / "config.json")
    vlm = VLM.load(run_dir, allow_dotted_paths=allow_dotted_paths, verify=verify).eval()
    projector = vlm.connector
    if not isinstance(projector, PerTokenConnector):
        raise ValueError(
            f"the pruning curve needs a run trained with a per-token projector (linear, mlpNx_gelu), "
            f"not {projector.spec.get('name')!r}"
        )
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown pruning-curve method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    _, _, eval_sets, _ = load_data(cfg, lambda m: None)
    test = next(iter(eval_sets.values()))
    samples = qa_samples(test, eval_limit)
    questions = question_digest([s.id for s in samples])
    images = [test.images.load(s.image) for s in samples[:4] if s.image is not None]
    info = vlm.encoder.info
    geometry = vlm.tiling.geometry if vlm.tiling is not None else None
    caches: dict[FeatureRequest, FeatureCache] = {}

    def features(connector) -> FeatureCache:
        """The features ``connector`` asks for, every one with the CLS attention, so that the encoder always runs
        its eager path and the selected layer's patches are the same numbers for every point."""
        ask = dataclasses.replace(connector.feature_request, cls_attention=True)
        if ask not in caches:
            caches[ask] = FeatureCache(vlm.encoder, test.images, with_attention=ask, tiling=geometry)
            caches[ask].ensure([s.image for s in samples if s.image is not None])
        return caches[ask]

    def point(connector) -> dict[str, Any]:
        vlm.connector = connector
        collator = Collator(vlm.llm, features(connector), vlm.max_visual_tokens(), vlm.max_length)
        answers = answer(vlm, samples, collator)
        scored = accuracy(samples, answers)
        return {
            "accuracy": scored["exact_match"],
            "correct": "".join(str(c) for c in scored["per_question"]["correct"]),
            "answers": answers,
            "tokens": tokens_after(connector, info) if geometry is None else tiled_tokens(vlm, connector, images),
        }

    layer = 2 if vlm.llm.model.config.num_hidden_layers > 2 else 1  # the paper's K = 2 where the LLM has room
    reducers = {m: (lambda r, m=m: [reducer_at(m, projector, r, info, fastv_layer=layer)]) for m in METHODS}
    reducers["random_keep"] = lambda r: [reducer_at("random_keep", projector, r, info, seed=s) for s in seeds]
    rows = []
    with autocast(run_precision(run_dir), vlm.device):  # the arithmetic the run trained with
        reference = point(projector)
        timed = [projector, *(CLSPrune.wrap(projector, keep_ratio=r) for r in ratios)] if "cls_prune" in methods else []
        timings = interleaved_prefill(vlm, timed, images) if timed else []
        for method in methods:
            for i, ratio in enumerate(ratios):
                points = [point(c) for c in reducers[method](ratio)]
                acc = [p["accuracy"] for p in points]
                mean, ref = statistics.fmean(acc), reference["accuracy"]
                row = {
                    "method": method,
                    "keep_ratio": ratio,
                    "tokens": points[0]["tokens"],
                    "accuracy": mean,
                    "accuracy_std": statistics.pstdev(acc),
                    "draws": len(points),
                    # per draw, each question's 0/1 exact match in sample order (the same questions in every row,
                    # named by ``questions``): paired comparisons between methods (benchmarks/directions.py)
                    "correct": [p["correct"] for p in points],
                    "questions": questions,
                    "answers": points[0]["answers"],
                    "retained": mean / ref if ref else None,
                    "unpruned_accuracy": ref,
                    "unpruned_answers": reference["answers"],
                }
                if method == "cls_prune":
                    row.update(prefill_ms=timings[i + 1][1], speedup=timings[0][1] / timings[i + 1][1])
                rows.append(row)
    vlm.connector = projector
    return rows


def question_digest(ids: list[str]) -> str:
    """The evaluated questions, named: their count and a digest of their ids in order (two curves' ``correct``
    strings pair position by position only when this is equal)."""
    return f"{len(ids)}:{hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}"


@torch.no_grad()
def tiled_tokens(vlm: VLM, connector, images) -> float:
    """A tiled model's visual tokens per image (mean over ``images``), as the LLM's later layers see them: every
    view through ``connector`` and merged as the model merges them (a reducer has no grid: its views' tokens in
    order), FastV's count after its LLM layer."""
    pixels, sizes = vlm.preprocess(images)
    ids = vlm.prompt_ids([True], ["?"]) * len(images)
    visual = vlm.visual_tokens(VLMInputs(ids, features=vlm.encode(pixels.to(vlm.device)), image_sizes=sizes), connector)
    counts = visual.num_tokens.tolist()
    if isinstance(connector, FastV):
        counts = [connector.llm_hook.keep_count(int(n)) for n in counts]
    return statistics.fmean(float(n) for n in counts)


def interleaved_prefill(vlm: VLM, connectors, images, rounds: int = 40) -> list[tuple[float, float]]:
    """(tokens, median prefill ms at batch 1) per connector, timed in interleaved rounds so that drifts of the
    machine (frequency, other load) hit every configuration alike."""
    fns, tokens = [], []
    for connector in connectors:
        vlm.connector = connector
        fn, n = prefill_fn(vlm, images[0])
        fns.append(fn)
        tokens.append(float(n))
    times = interleaved_samples(fns, rounds, warmup=3)  # the first rounds warm up
    return [(n, 1000 * statistics.median(t)) for n, t in zip(tokens, times)]
