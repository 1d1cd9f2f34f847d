"""``bench profile``: efficiency figures of any combination, measured without training.

- visual tokens per image (mean, min, max) over a few images of different content;
- trainable (connector) and total parameters;
- FLOPs of the connector and of the LLM prefill, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
  multiplies and attention; elementwise work is not counted);
- prefill latency (= time to first token: the forward over the prompt, logits of the last position only, as
  generation computes them) and decode tokens per second at batch 1: (time of ``generate`` with N new tokens - time
  with 1) / (N - 1), both through ``generate`` and timed in interleaved rounds, medians;
- peak memory: CUDA's allocator peak on GPUs, the process's peak resident set size elsewhere.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.model.vlm import VLM, VLMInputs


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
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def prefill_fn(vlm: VLM, image, prompt: str = "What colour is the circle?"):
    """A no-grad callable running the LLM prefill of one (image, prompt) at batch 1, and its visual token count."""
    features = vlm.encode(vlm.encoder.preprocess([image]).to(vlm.device))
    with torch.no_grad():
        visual = vlm.connector(features)
        embeds, mask, _, pos = vlm.splice(VLMInputs(vlm.prompt_ids([True], [prompt]), has_image=[True]), visual)

    @torch.no_grad()
    def run():
        return vlm.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1)  # fmt: skip

    return run, int(visual.num_tokens[0])


@torch.no_grad()
def profile(vlm: VLM, images, prompt: str = "What colour is the circle?", decode_tokens: int = 16,
            repeats: int = 20) -> dict[str, Any]:  # fmt: skip
    vlm.eval()
    device = vlm.device
    pixel_values = vlm.encoder.preprocess(images).to(device)
    features = vlm.encode(pixel_values)
    counts = vlm.connector(features).num_tokens.tolist()
    one = features.select(slice(0, 1))
    ids = vlm.prompt_ids([True], [prompt])
    inputs = VLMInputs(ids, features=one, has_image=[True])
    embeds, mask, _, pos = vlm.splice(inputs, vlm.connector(one))

    def prefill():
        return vlm.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1)  # fmt: skip

    def generate(n: int):
        return lambda: vlm.llm.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=vlm.llm.pad_token_id,
        )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill_s = timed(prefill, repeats)
    first, all_new = interleaved([generate(1), generate(decode_tokens)], max(5, repeats // 4))
    decode_s = all_new - first  # the decode steps alone: prefill and generate's set-up cancel
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return {
        "visual_tokens_per_image": {"mean": sum(counts) / len(counts), "min": min(counts), "max": max(counts),
                                    "per_image": counts},
        "parameters": {"connector": vlm.connector.num_parameters(),
                       "total": sum(p.numel() for p in vlm.parameters())},
        "flops": {"connector": count_flops(lambda: vlm.connector(one)), "llm_prefill": count_flops(prefill)},
        "prefill_tokens": int(mask.sum()),
        "prefill_latency_ms": 1000 * prefill_s,
        "decode_tokens_per_second": (decode_tokens - 1) / decode_s if decode_s > 0 else None,
        "peak_memory_bytes": int(peak),
    }  # fmt: skip
