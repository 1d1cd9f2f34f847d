"""The training-free pruning curve (FasterVLM's setting): a trained ``linear``/``mlpNx_gelu`` run evaluated with
``cls_prune`` in front of its projector at several keep ratios, with no retraining.

Every point, the unpruned reference included, is evaluated on the same cached features (computed with the encoder's
eager attention, which pruning needs), so the 100 % point equals the unpruned accuracy exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.evaluate import accuracy, answer, qa_samples
from bench.features import FeatureCache
from bench.loader import Collator
from bench.precision import autocast, run_precision
from bench.profile import prefill_fn
from bench.run import RunConfig, load_data
from bench.vlm import VLM
from connectors.base import PerTokenConnector
from connectors.cls_prune import CLSPrune


def pruning_curve(run_dir: Path, ratios: list[float], eval_limit: int | None = 1000, allow_dotted_paths: bool = False,
                  verify: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    cfg = RunConfig.from_file(run_dir / "config.json")
    vlm = VLM.load(run_dir, allow_dotted_paths=allow_dotted_paths, verify=verify).eval()
    projector = vlm.connector
    if not isinstance(projector, PerTokenConnector):
        raise ValueError(f"the pruning curve needs a run trained with a per-token projector (linear, mlpNx_gelu), "
                         f"not {projector.spec.get('name')!r}")  # fmt: skip
    _, _, eval_sets, _ = load_data(cfg, lambda m: None)
    test = next(iter(eval_sets.values()))
    features = FeatureCache(vlm.encoder, test.images, with_attention=True)
    samples = qa_samples(test, eval_limit)
    features.ensure([s.image for s in samples if s.image is not None])
    images = [test.images.load(s.image) for s in samples[:4] if s.image is not None]

    def point(connector) -> dict[str, Any]:
        vlm.connector = connector
        collator = Collator(vlm.llm, features, connector.max_tokens(vlm.encoder.info), vlm.max_length)
        answers = answer(vlm, samples, collator)
        return {"accuracy": accuracy(samples, answers)["exact_match"], "answers": answers}

    connectors = [projector, *(CLSPrune.wrap(projector, keep_ratio=r) for r in ratios)]
    with autocast(run_precision(run_dir), vlm.device):  # the arithmetic the run trained with
        points = [point(c) for c in connectors]
        for p, (tokens, ms) in zip(points, interleaved_prefill(vlm, connectors, images)):
            p.update(tokens=tokens, prefill_ms=ms)
    reference, rows = points[0], []
    for ratio, p in zip(ratios, points[1:]):
        rows.append(
            {
                "keep_ratio": ratio,
                **p,
                "retained": p["accuracy"] / reference["accuracy"] if reference["accuracy"] > 0 else None,
                "speedup": reference["prefill_ms"] / p["prefill_ms"],
                "unpruned_accuracy": reference["accuracy"],
                "unpruned_answers": reference["answers"],
            }
        )
    vlm.connector = projector
    return rows


def interleaved_prefill(vlm: VLM, connectors, images, rounds: int = 40) -> list[tuple[float, float]]:
    """(tokens, median prefill ms at batch 1) per connector, timed in interleaved rounds so that drifts of the
    machine (frequency, other load) hit every configuration alike."""
    import statistics
    import time

    fns, tokens = [], []
    for connector in connectors:
        vlm.connector = connector
        fn, n = prefill_fn(vlm, images[0])
        fns.append(fn)
        tokens.append(float(n))
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds + 3):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if r >= 3:  # the first rounds warm up
                times[i].append(1000 * (time.perf_counter() - t0))
    return [(n, statistics.median(t)) for n, t in zip(tokens, times)]
