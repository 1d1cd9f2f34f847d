"""The training-free pruning curve (FasterVLM's setting): a trained ``linear``/``mlpNx_gelu`` run evaluated with
``cls_prune`` in front of its projector at several keep ratios, with no retraining.

Every point, the unpruned reference included, is evaluated on the same cached features (computed with the encoder's
eager attention, which pruning needs), so the 100 % point equals the unpruned accuracy exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.data import Collator
from bench.evaluate import accuracy, answer, qa_samples
from bench.features import FeatureCache
from bench.profile import profile
from bench.run import RunConfig, load_data
from bench.vlm import VLM
from connector_zoo.io import read_json
from connectors.base import PerTokenConnector
from connectors.cls_prune import CLSPrune


def pruning_curve(run_dir: Path, ratios: list[float], eval_limit: int | None = 1000) -> list[dict[str, Any]]:
    cfg = RunConfig(**read_json(run_dir / "config.json"))
    vlm = VLM.load(run_dir).eval()
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
        prof = profile(vlm, images, repeats=5)
        return {
            "accuracy": accuracy(samples, answers)["exact_match"],
            "answers": answers,
            "tokens": prof["visual_tokens_per_image"]["mean"],
            "prefill_ms": prof["prefill_latency_ms"],
        }

    reference = point(projector)
    rows = []
    for ratio in ratios:
        p = point(CLSPrune.wrap(projector, keep_ratio=ratio))
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
