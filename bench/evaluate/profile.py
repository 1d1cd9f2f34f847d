"""``bench profile``: efficiency figures of any combination, measured without training.

- visual tokens per image (mean, min, max) over a few images of different content;
- trainable (connector) and total parameters;
- FLOPs of the connector and of the LLM prefill, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
  multiplies and attention; elementwise work is not counted);
- prefill latency (= time to first token: the forward over the prompt, logits of the last position only, as
  generation computes them) and decode tokens per second at batch 1: (time of ``generate`` with N new tokens - time
  with 1) / (N - 1), both through ``generate`` and timed in interleaved rounds, medians;
- peak memory: CUDA's allocator peak on GPUs, the process's peak resident set size elsewhere.

``prefill_comparison`` (``bench profile --keep SHARE``) times a per-token projector alone and each training-free
reducer in front of it at one share of the image tokens, connector + LLM prefill, in interleaved rounds; FastV runs
through its LLM hook, so its removal of the dropped tokens is what is timed.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from connector_zoo.model.vlm import VLM, VLMInputs
from connectors import build_connector
from connectors.avgpool import AvgPool
from connectors.cls_prune import CLSPrune
from connectors.fastv import FastV
from connectors.prumerge import PruMerge
from connectors.random_keep import RandomKeep
from connectors.visionzip import VisionZip


def count_flops(fn) -> int:
    """FLOPs of ``fn()``'s forward. Grad mode is on because FlopCounterMode's module tracker hooks autograd, which
    fails on views of parameters made under no_grad (the Q-Former's expanded queries); nothing is backpropagated."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns, repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each of ``fns``, timed in interleaved rounds so machine drift hits all alike."""
    return [statistics.median(t) for t in interleaved_samples(fns, repeats, warmup)]


def prefill_fn(vlm: VLM, image, prompt: str = "What colour is the circle?", connector_too: bool = False):
    """A no-grad callable running the LLM prefill of one (image, prompt) at batch 1, and its visual token count.
    ``connector_too``: the callable also runs the connector and the splice on the image's features (a reducer's own
    work, e.g. PruMerge's merging, is then part of the time); the encoder forward never is."""
    pixels, sizes = vlm.preprocess([image])
    features = vlm.encode(pixels.to(vlm.device))
    connector = vlm.connector  # bound now: a caller may swap the model's connector before calling run()
    inputs = VLMInputs(vlm.prompt_ids([True], [prompt]), features=features, has_image=[True], image_sizes=sizes)

    def prepare():
        visual = vlm.visual_tokens(inputs, connector)  # (AnyRes: the views merged per image)
        return (visual, *vlm.splice(inputs, visual))

    with torch.no_grad():
        ready = prepare()

    @torch.no_grad()
    def run():
        visual, embeds, mask, _, pos = prepare() if connector_too else ready
        with vlm.llm_hook(inputs, visual, mask, None, left_padded=True, connector=connector):  # FastV: in the LLM
            return vlm.llm.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
            )

    return run, int(ready[0].num_tokens[0])


#: the reducers ``prefill_comparison`` and the pruning curve set to a share of the image tokens
REDUCERS = ("cls_prune", "random_keep", "avgpool", "visionzip", "prumerge", "fastv")


def reducer_at(method: str, projector, share: float, info, fastv_layer: int = 2, seed: int = 0):
    """``method`` in front of ``projector`` (sharing its weights) set to keep ``share`` of the image tokens: cls_prune,
    random_keep, avgpool by ratio; VisionZip's k = round(share * N) split 54 : 10 (dominant with CLS : contextual);
    PruMerge's fixed ratio (``adaptive=False``: int(share * N) kept and merged, + 1 pooled token); FastV's R = 1 -
    share after LLM layer ``fastv_layer`` (the paper's K = 2)."""

    if method == "visionzip":
        k = max(1, round(share * info.num_patches))
        dominant = max(1, round(k * 54 / 64))
        return VisionZip.wrap(projector, dominant=dominant, contextual=max(0, k - dominant))
    makers = {
        "cls_prune": lambda: CLSPrune.wrap(projector, keep_ratio=share),
        "random_keep": lambda: RandomKeep.wrap(projector, keep_ratio=share, seed=seed),
        "avgpool": lambda: AvgPool.wrap(projector, keep_ratio=share),
        "prumerge": lambda: PruMerge.wrap(projector, adaptive=False, keep_ratio=share),
        "fastv": lambda: FastV.wrap(projector, k=fastv_layer, r=1 - share),
    }
    if method not in makers:
        raise ValueError(f"unknown reducer {method!r}; known: {', '.join(REDUCERS)}")
    return makers[method]()


def tokens_after(connector, info) -> float:
    """The visual tokens the LLM's later layers work on: FastV's after its LLM layer, PruMerge's fixed count, else
    the count the reducer emits."""

    if isinstance(connector, FastV):
        return float(connector.llm_hook.keep_count(info.num_patches))
    if isinstance(connector, PruMerge) and not connector.adaptive:
        return float(int(info.num_patches * connector.keep_ratio) + 1)
    return float(connector.max_tokens(info))


@torch.no_grad()
def prefill_comparison(
    encoder,
    llm,
    methods: list[str],
    share: float,
    image,
    repeats: int = 5,
    fastv_layer: int = 2,
    projector: str = "mlp2x_gelu",
) -> list[dict[str, Any]]:
    """Connector + LLM prefill time at batch 1 of one image for ``projector`` alone (the first row, the baseline)
    and each reducer in ``methods`` in front of the same projector at ``share`` of the image tokens, timed in
    interleaved rounds after one warm-up round: median, min and max per row, speed-up = baseline median / row's."""

    info = encoder.info
    torch.manual_seed(0)
    base = build_connector(projector, info.hidden_size, llm.hidden_size).eval()
    connectors = [base] + [reducer_at(m, base, share, info, fastv_layer).eval() for m in methods if m != projector]
    fns, entering = [], []
    for connector in connectors:
        fn, n = prefill_fn(VLM(encoder, connector, llm).eval(), image, connector_too=True)
        fns.append(fn)
        entering.append(n)
    times = interleaved_samples(fns, repeats)
    medians = [statistics.median(t) for t in times]
    rows = []
    for connector, n, t, med in zip(connectors, entering, times, medians):
        after = tokens_after(connector, info) if connector is not base else float(n)
        rows.append(
            {
                "connector": connector.spec["name"],
                "tokens_in": n,
                "tokens_after": after,
                "kept_share": after / info.num_patches,
                "prefill_ms": 1000 * med,
                "min_ms": 1000 * min(t),
                "max_ms": 1000 * max(t),
                "speedup": medians[0] / med,
                "repeats": len(t),
            }
        )
    return rows


def interleaved_samples(fns, repeats: int, warmup: int = 1) -> list[list[float]]:
    """Every timing (s) of each of ``fns`` over ``repeats`` interleaved rounds after ``warmup`` untimed ones."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def profile(
    vlm: VLM, images, prompt: str = "What colour is the circle?", decode_tokens: int = 16, repeats: int = 20
) -> dict[str, Any]:
    vlm.eval()
    device = vlm.device
    pixel_values, sizes = vlm.preprocess(images)
    pixel_values = pixel_values.to(device)
    features = vlm.encode(pixel_values)
    ids = vlm.prompt_ids([True], [prompt])
    counts = vlm.visual_tokens(VLMInputs(ids * len(images), features=features, image_sizes=sizes)).num_tokens.tolist()
    views = vlm.tiling.views_per_image(sizes[:1])[0] if vlm.tiling is not None else 1  # the first image's
    one = features.select(slice(0, views))
    inputs = VLMInputs(ids, features=one, has_image=[True], image_sizes=sizes and sizes[:1])
    visual = vlm.visual_tokens(inputs)
    embeds, mask, _, pos = vlm.splice(inputs, visual)
    hook = lambda: vlm.llm_hook(inputs, visual, mask, None, left_padded=True)  # noqa: E731  (FastV: inside the LLM)

    def prefill():
        with hook():
            return vlm.llm.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
            )

    def generate(n: int):
        def run():
            with hook():
                return vlm.llm.model.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=vlm.llm.pad_token_id,
                )

        return run

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill_s = timed(prefill, repeats)
    first, all_new = interleaved([generate(1), generate(decode_tokens)], max(5, repeats // 4))
    decode_s = all_new - first  # the decode steps alone: prefill and generate's set-up cancel
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "views_per_image": vlm.tiling.views_per_image(sizes) if vlm.tiling is not None else [1] * len(images),
        "visual_tokens_per_image": {
            "mean": sum(counts) / len(counts),
            "min": min(counts),
            "max": max(counts),
            "per_image": counts,
        },
        "parameters": {"connector": vlm.connector.num_parameters(), "total": sum(p.numel() for p in vlm.parameters())},
        "flops": {
            "encoder": count_flops(lambda: vlm.encode(pixel_values[:views])),
            "connector": count_flops(lambda: vlm.visual_tokens(inputs)),
            "llm_prefill": count_flops(prefill),
        },
        "prefill_tokens": int(mask.sum()),
        "prefill_latency_ms": 1000 * prefill_s,
        "decode_tokens_per_second": (decode_tokens - 1) / decode_s if decode_s > 0 else None,
        "peak_memory_bytes": int(peak),
    }
