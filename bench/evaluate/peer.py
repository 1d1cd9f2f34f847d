"""``bench peer``: this harness against the recipe a user would otherwise copy, on the same stage-1 setting.

Both train the same model (any clip/siglip + ``mlp2x_gelu`` + Llama-family/Qwen3 combination, by default tiny CLIP +
tiny Llama on the mini world; real widths with ``random:`` checkpoints or real ones; identical initial weights) on the
same samples (the mini world or LLaVA JSON) in the same order, with the same batch, steps, learning rate and schedule,
connector only:

- this harness: ``bench.train.trainer.Trainer`` on features from the frozen-encoder cache (built once, timed
  separately);
- the peer: transformers' ``LlavaForConditionalGeneration`` (exported from the same weights) trained by transformers'
  ``Trainer``, which runs the frozen vision tower on every step, with the Llava processor's expanded image tokens.

It prints the samples per second of each, their ratio, both final losses (mean over the last 10 % of steps), the
peak memory during each one's training, and the achieved GFLOP/s of each against this machine's measured fp32
matrix-multiply rate (FLOPs of one training step counted by FlopCounterMode; the peer also runs the vision tower).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.data.features import FeatureCache
from bench.data.formats import Dataset
from bench.data.loader import Collator
from bench.train.assemble import build_model, load_data
from bench.train.precision import matmul_seconds
from bench.train.settings import RunConfig, StageConfig
from bench.train.trainer import Trainer
from connector_zoo.model.llava import to_llava
from connector_zoo.model.vlm import VLM
from connector_zoo.settings import check_choice
from llms.base import IGNORE_INDEX


def peer_benchmark(
    cfg=None, steps: int = 60, batch_size: int = 16, lr: float = 2e-3, precision: str = "no", log=print
) -> dict[str, Any]:
    """Both trainers on ``cfg``'s combination and data (a ``bench.train.settings.RunConfig``; default: the mini world
    with tiny CLIP + ``mlp2x_gelu`` + tiny Llama). The combination must be expressible as Llava (clip/siglip +
    mlp2x_gelu + a Llama-family or Qwen3 LLM), since the peer is transformers' own Llava model. ``precision``: "no"
    (fp32) or "bf16" (autocast on both sides: ours' ``--precision bf16``, the peer's ``TrainingArguments(bf16=True)``;
    fp32 master weights on both)."""
    check_choice("bench peer", "precision", precision, PEER_PRECISIONS)

    cfg = cfg or RunConfig(connector={"name": "mlp2x_gelu"})
    train, _, _, world = load_data(cfg, lambda m: None)
    vlm = build_model(cfg, world, lambda m: None)  # seeded by cfg.seed
    with_image = [s for s in train.samples if s.image is not None]
    if len(with_image) < steps * batch_size:
        raise ValueError(f"bench peer needs {steps * batch_size} samples with images; the data has {len(with_image)}")
    data = Dataset(train.name, with_image[: steps * batch_size], train.images)
    stage = StageConfig(
        stage=1, steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=0.05, save_every=10**9, max_grad_norm=1.0
    )
    seed = cfg.seed
    hf_model, processor = to_llava(vlm.eval())  # the peer starts from identical weights

    # ---- this harness
    t0 = time.perf_counter()
    cache = FeatureCache(vlm.encoder, data.images, with_attention=False)
    cache.ensure(sorted({s.image for s in data.samples}))
    cache_seconds = time.perf_counter() - t0
    collator = Collator(vlm.llm, cache, vlm.connector.max_tokens(vlm.encoder.info), None)

    flops = train_flops_per_sample(vlm, collator, data)
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as ours_peak:
        trainer = Trainer(vlm, data, collator, stage, Path(tmp), seed=seed, log=lambda m: None, autocast=precision)
        ours = trainer.fit()
        tail = max(1, steps // 10)
        ours["final_loss"] = sum(h["loss"] for h in trainer.history[-tail:]) / tail
        ours["losses"] = [h["loss"] for h in trainer.history]
        order = [trainer.micro_batch(step, 0) for step in range(steps)]

    # ---- the peer: transformers Trainer on LlavaForConditionalGeneration (the vision tower runs every step)
    encoder_flops = 2 * vlm.encoder.info.num_patches * sum(p.numel() for p in vlm.encoder.parameters())
    with PeakRSS() as peer_peak:
        peer = train_peer(hf_model, processor, vlm, data, order, stage, seed, precision)
    rate = matmul_rate(dtype=PEER_PRECISIONS[precision])
    result = {
        "steps": steps,
        "batch_size": batch_size,
        "precision": precision,
        "ours_samples_per_second": ours["train_samples_per_second"],
        "ours_final_loss": ours["final_loss"],
        "ours_losses": ours["losses"],
        "ours_feature_cache_seconds": cache_seconds,
        "ours_peak_rss_bytes": ours_peak.peak,
        "ours_gflops_per_second": flops * ours["train_samples_per_second"] / 1e9,
        "peer_samples_per_second": peer["samples_per_second"],
        "peer_final_loss": peer["final_loss"],
        "peer_losses": peer["losses"],
        "peer_peak_rss_bytes": peer_peak.peak,
        "peer_gflops_per_second": (flops + encoder_flops) * peer["samples_per_second"] / 1e9,
        "matmul_gflops_per_second": rate / 1e9,
        "train_flops_per_sample": flops,
    }
    result["speedup"] = result["ours_samples_per_second"] / result["peer_samples_per_second"]
    return result


def train_flops_per_sample(vlm: VLM, collator: Collator, data: Dataset) -> float:
    """FLOPs of one training step (forward + backward) of one sample, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    vlm.train()
    for p in vlm.connector.parameters():
        p.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        vlm(collator(data.samples[:1])).loss.backward()
    vlm.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


#: the compute precisions both sides of ``bench peer`` run in, and the dtype whose matrix-multiply rate is printed
PEER_PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16}


def matmul_rate(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-multiply rate in ``dtype`` (FLOP/s, median of ``repeats``) at the current thread
    count."""

    return 2 * n * 4 * n * n / statistics.median(matmul_seconds(n, 4 * n, n, dtype=dtype, repeats=repeats))


class PeakRSS:
    """The process's peak resident set size while the block runs (sampled every 50 ms; CUDA: the allocator peak)."""

    def __enter__(self):

        import psutil

        self.peak, self._stop = 0, threading.Event()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        proc = psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        return False


def peer_tokens(vlm: VLM, sample) -> tuple[list[int], list[int]]:
    """A sample's token ids and labels as the Llava processor gives them: our template's tokens, with the ``<image>``
    token repeated once per patch of the encoder (no labels on those)."""
    n_vis, image_id = vlm.encoder.info.num_patches, vlm.llm.image_token_id
    enc = vlm.llm.encode_conversation(sample.messages)
    ids, labels = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        reps = n_vis if tok == image_id else 1
        ids += [tok] * reps
        labels += [IGNORE_INDEX if tok == image_id else lab] * reps
    return ids, labels


def pad_collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """The peer's batch: ids, labels and mask padded on the right to the longest item; the pixel values of the items
    that have an image, stacked (none: no ``pixel_values``)."""
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), longest), pad_id)
    labels = torch.full((len(items), longest), IGNORE_INDEX)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for b, it in enumerate(items):
        k = len(it["input_ids"])
        ids[b, :k], labels[b, :k], mask[b, :k] = it["input_ids"], it["labels"], 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [it["pixel_values"] for it in items if "pixel_values" in it]
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out


def hf_fit(model, samples, collate, stage: StageConfig, seed: int, precision: str = "no") -> tuple[float, list[float]]:
    """transformers' Trainer on ``samples`` in their order (a sequential sampler), with ``stage``'s batch, steps,
    learning rate, cosine schedule, warm-up, weight decay, clipping and gradient checkpointing, under bf16 autocast
    when ``precision`` is "bf16" (its ``bf16=True``; the default optimizer, ``adamw_torch_fused``, as ours); the
    seconds of ``train()`` and the loss logged at each step."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    # accelerate keeps one state per process, and its mixed precision is the first Accelerator's: the peer's
    # Trainer must start from none (ours ran before it in this process), and leave none (or a later run here, such as
    # a second peer benchmark, would train in the peer's precision: a test caught fp32 running as bf16)
    AcceleratorState._reset_state()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=stage.batch_size,
            max_steps=stage.steps,
            learning_rate=stage.lr,
            lr_scheduler_type="cosine",
            warmup_steps=int(stage.warmup_ratio * stage.steps),
            weight_decay=stage.weight_decay,
            max_grad_norm=stage.max_grad_norm,
            gradient_checkpointing=stage.gradient_checkpointing,
            bf16=precision == "bf16",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=seed,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        trainer = HFTrainer(model=model, args=args, train_dataset=samples, data_collator=collate)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(samples)
        t0 = time.perf_counter()
        try:
            trainer.train()
        finally:
            AcceleratorState._reset_state()
        seconds = time.perf_counter() - t0
    return seconds, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_peer(
    model, processor, vlm: VLM, data: Dataset, order, stage: StageConfig, seed: int, precision: str = "no"
) -> dict[str, Any]:
    def expand(sample) -> dict[str, torch.Tensor]:
        ids, labels = peer_tokens(vlm, sample)
        pixel_values = processor.image_processor(images=data.images.load(sample.image), return_tensors="pt")
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values["pixel_values"][0],
        }

    flat = [s for batch in order for s in batch]  # the same samples in the same order as our run

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(flat)

        def __getitem__(self, i):
            return expand(flat[i])

    def collate(items):
        return pad_collate(items, vlm.llm.pad_token_id)

    for name, p in model.named_parameters():
        p.requires_grad = "multi_modal_projector" in name  # stage 1: the projector only

    seconds, losses = hf_fit(model, Samples(), collate, stage, seed, precision)
    tail = max(1, stage.steps // 10)
    return {
        "samples_per_second": stage.steps * stage.batch_size / seconds,
        "final_loss": sum(losses[-tail:]) / tail,
        "losses": losses,
    }
