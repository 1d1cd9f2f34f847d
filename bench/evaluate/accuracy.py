"""Evaluation: exact-match accuracy (overall and per question type) by greedy generation, caption / held-out loss,
examples next to the truth, and the blind baseline (the same LLM with no image) that gives every number its floor."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.data.formats import BadSample, Dataset, Sample
from bench.data.loader import Collator
from bench.train.trainer import validation_loss
from connector_zoo.io import cache_dir, progress, read_json, show_progress, write_json
from connector_zoo.model.vlm import VLM, VLMInputs
from llms.base import IMAGE_TOKEN, LLMBackend


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", text.lower()).strip()


def strip_image(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [
        {**m, "content": m["content"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()}
        for m in messages
    ]


@torch.no_grad()
def answer(
    vlm: VLM,
    samples: list[Sample],
    collator: Collator,
    blind: bool = False,
    batch_size: int = 64,
    unreadable: dict[str, str] | None = None,
    max_new_tokens: int = 12,
) -> list[str | None]:
    """Greedy answers to the last user turn of each sample (the reference answer is dropped); None for a sample
    whose image cannot be read (the reason goes to ``unreadable``)."""
    vlm.eval()
    unreadable = {} if unreadable is None else unreadable
    out: list[str | None] = []
    starts = range(0, len(samples), batch_size)
    for start in progress(
        starts,
        desc="answering" + (" blind" if blind else ""),
        unit="batch",
        leave=False,
        disable=not show_progress() or len(starts) < 2,
    ):
        chunk = samples[start : start + batch_size]
        features, sizes = None, None
        if not blind and any(s.image is not None for s in chunk):
            got = collator.features.fetch([s.image for s in chunk if s.image is not None])
            reasons = got.by_sample([s.image is not None for s in chunk])
            bad = set(reasons)
            unreadable.update({chunk[j].id: reason for j, reason in reasons.items()})
            features, sizes = got.features, got.image_sizes
        else:
            bad = set()
        keep = [j for j in range(len(chunk)) if j not in bad]
        answers = iter([])
        if keep:
            prompts = [chunk[j].messages[:-1] for j in keep]
            if blind:
                prompts = [strip_image(p) for p in prompts]
            ids = [torch.tensor(vlm.llm.encode_prompt(p)) for p in prompts]
            has_image = [not blind and chunk[j].image is not None for j in keep]
            inputs = VLMInputs(ids, features=features, has_image=has_image, image_sizes=sizes)
            answers = iter(vlm.decode(vlm.generate_ids(inputs, max_new_tokens=max_new_tokens)))
        out.extend(None if j in bad else next(answers) for j in range(len(chunk)))
    return out


def accuracy(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    hits: dict[str, list[int]] = defaultdict(list)
    contains: list[int] = []
    correct: list[int] = []  # per question, in sample order
    for s, pred in zip(samples, predictions):
        truth, guess = normalize(s.messages[-1]["content"]), normalize(pred)
        correct.append(int(truth == guess))
        hits[s.meta.get("type", "all")].append(correct[-1])
        contains.append(int(bool(truth) and re.search(rf"\b{re.escape(truth)}\b", guess) is not None))
    return {
        "exact_match": sum(correct) / max(len(correct), 1),
        "contains_match": sum(contains) / max(len(contains), 1),
        "per_type": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "count": len(correct),
        "images": len({s.image for s in samples if s.image is not None}),  # the questions ask about these many
        # per question, for paired comparisons between runs (bench/evaluate/stats.py) and the report's gallery: the
        # sample ids, 0/1 exact match and the answer as generated (None: the image could not be read)
        "per_question": {"ids": [s.id for s in samples], "correct": correct, "answers": list(predictions)},
    }


def qa_samples(data: Dataset, limit: int | None = None) -> list[Sample]:
    """The mini world's questions (captions excluded)."""
    out = [s for s in data.samples if s.meta.get("type") != "caption"]
    return out if limit is None else out[:limit]


def short_answer_samples(data: Dataset, max_words: int = 3) -> list[Sample]:
    return [s for s in data.samples if len(s.messages[-1]["content"].split()) <= max_words]


def eval_samples(data: Dataset, collator: Collator, limit: int | None) -> list[Sample]:
    """The questions evaluated: the world's QA (not captions), or short-answer samples of published data; the first
    ``limit`` that tokenize and fit (the rest of the split is not read); every one when ``limit`` is None."""
    samples = qa_samples(data) if any("type" in s.meta for s in data.samples) else short_answer_samples(data)
    usable = (s for s in samples if _usable(collator, s))
    return list(usable) if limit is None else [s for _, s in zip(range(limit), usable)]


def blind_answers(
    vlm: VLM,
    data: Dataset,
    collator: Collator,
    limit: int | None,
    cache: Path | None = None,
    weights: str | None = None,
) -> list[str]:
    """The blind baseline: the LLM *as loaded, before this run trained anything*, answering from the text alone.

    Called before training (or before a run's weights are loaded), so a stage-2 run is compared with its base LLM,
    which for the mini world has read every training question and answer as text: the floor knows the answer priors.

    ``cache`` (a directory): the answers are kept there under :func:`blind_key`, everything they are computed from,
    and read back by the next run that asks the same (every cell of a sweep on one LLM does: ~40 s a run at the
    pretrained level on an AMD EPYC without AMX, 2 cores; docs/training.md); a file that does not read as the
    answers to these questions is computed again. ``weights``: the LLM's :func:`weights_digest`, when the caller has
    it (one digest serves every split).
    """
    samples = eval_samples(data, collator, limit)
    if cache is None:
        return answer(vlm, samples, collator, blind=True)
    path, ids = cache / f"{blind_key(vlm, samples, weights=weights)}.json", [s.id for s in samples]
    digest = lambda answers: hashlib.sha256(json.dumps([ids, answers]).encode()).hexdigest()  # noqa: E731
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # unreadable or damaged: computed again
        kept = read_json(path)
        if kept["ids"] == ids and kept["sha256"] == digest(kept["answers"]):
            return kept["answers"]
    out = answer(vlm, samples, collator, blind=True)
    write_json(path, {"ids": ids, "answers": out, "sha256": digest(out)})
    return out


def blind_baselines(
    vlm: VLM, eval_sets: dict[str, Dataset], collators: dict[str, Collator], limit: int | None, feature_cache: str
) -> dict[str, list[str]]:
    """:func:`blind_answers` for each evaluation split (``collators`` by split name), kept beside the feature cache
    (``<cache>/blind``) unless the run turns caches off (``feature_cache="off"``); the LLM's weights are digested
    once for all splits."""
    cache = None if feature_cache == "off" else cache_dir() / "blind"
    weights = weights_digest(vlm.llm) if cache else None
    return {name: blind_answers(vlm, ds, collators[name], limit, cache, weights) for name, ds in eval_sets.items()}


#: the code that turns questions into blind answers: a change to any of these files is another key
BLIND_CODE = (Path(__file__), Path(inspect.getfile(VLM)), Path(inspect.getfile(LLMBackend)))


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of a module's weights and buffers: each one's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def blind_key(
    vlm: VLM, samples: list[Sample], batch_size: int = 64, max_new_tokens: int = 12, weights: str | None = None
) -> str:
    """A digest of everything :func:`answer` reads to answer ``samples`` blind: the LLM's weights and buffers (bytes,
    names, dtypes, shapes), its class and tokenizer, each prompt's token ids as the blind model sees them (the
    questions, the chat template and the tokenizer), the batching (which decides the padding) and the generation
    length, the autocast in effect, the device, the torch version and thread count (floating-point reductions), and
    the source of the code that answers (``BLIND_CODE`` and the backend's module). Two runs with equal keys compute
    the same answers."""
    h = hashlib.blake2b(digest_size=16)
    llm = vlm.llm
    cpu_autocast = torch.is_autocast_enabled("cpu") and str(torch.get_autocast_dtype("cpu"))
    cuda_autocast = torch.cuda.is_available() and torch.is_autocast_enabled("cuda") and "cuda"
    tok = getattr(llm, "tokenizer", None)
    about = {
        "llm": f"{type(llm).__module__}.{type(llm).__qualname__}",
        "tokenizer": [type(tok).__name__, len(tok) if tok is not None else None],
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "autocast": [cpu_autocast, cuda_autocast],
        "device": str(vlm.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    h.update(json.dumps(about, sort_keys=True).encode())
    for f in (*BLIND_CODE, Path(inspect.getfile(type(llm)))):
        h.update(f.read_bytes())
    h.update((weights or weights_digest(llm)).encode())
    for s in samples:
        h.update(json.dumps(llm.encode_prompt(strip_image(s.messages[:-1]))).encode())
    return h.hexdigest()


def evaluate_split(
    vlm: VLM, data: Dataset, collator: Collator, limit: int | None, blind: list[str], examples: int = 5
) -> dict[str, Any]:
    """Accuracy with the image next to the blind baseline's, plus loss on captions (or on all held-out samples);
    nothing (an empty dict) when ``limit`` is 0."""
    if limit == 0:
        return {}
    samples = eval_samples(data, collator, limit)
    result: dict[str, Any] = {}
    unreadable: dict[str, str] = {}
    preds = answer(vlm, samples, collator, unreadable=unreadable)
    for sample_id, reason in unreadable.items():
        data.skip(sample_id, reason, strict=False)
    # a sample whose image cannot be read is left out of both sides of the comparison
    kept = [t for t in zip(samples, preds, blind) if t[1] is not None]
    samples, preds, blind = [t[0] for t in kept], [t[1] for t in kept], [t[2] for t in kept]
    if samples:
        result["accuracy"] = accuracy(samples, preds)
        result["blind"] = accuracy(samples, blind)
        result["examples"] = [
            {
                "id": s.id,
                "question": s.messages[-2]["content"].replace(IMAGE_TOKEN, "").strip(),
                "truth": s.messages[-1]["content"],
                "answer": p,
                "blind": b,
            }
            for s, p, b in list(zip(samples, preds, blind))[:examples]
        ]
    captions = [s for s in data.samples if s.meta.get("type") == "caption"] or data.samples
    loss = validation_loss(
        vlm, Dataset(data.name, captions, data.images, data.skipped, data._seen), collator, batch_size=32, limit=500
    )
    result["caption_loss" if captions is not data.samples else "loss"] = loss  # None: no usable sample
    result["perplexity"] = None if loss is None else math.exp(min(loss, 50))
    return result


def shown_loss(loss: float | None, digits: int) -> str:
    """A loss as printed: its value, or that no usable sample was there to compute it over."""
    return "not evaluated (no usable sample)" if loss is None else f"{loss:.{digits}f}"


def _usable(collator: Collator, sample: Sample) -> bool:
    try:
        collator.encode(sample)
        return True
    except BadSample:
        return False
