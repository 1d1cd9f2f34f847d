"""``bench peer``: this harness against the recipe a user would otherwise copy, on the same stage-1 setting.

Both train the same model (tiny CLIP + ``mlp2x_gelu`` + tiny Llama, the mini world's backbones, identical initial
weights) on the same mini-world samples in the same order, with the same batch, steps, learning rate and schedule,
connector only:

- this harness: ``bench.train.Trainer`` on features from the frozen-encoder cache (built once, timed separately);
- the peer: transformers' ``LlavaForConditionalGeneration`` (exported from the same weights) trained by transformers'
  ``Trainer``, which runs the frozen vision tower on every step, with the Llava processor's expanded image tokens.

It prints the samples per second of each, their ratio, and both final losses (mean over the last 10 % of steps).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.data import Collator, Dataset, world_dataset
from bench.export import to_llava
from bench.features import FeatureCache
from bench.train import StageConfig, Trainer
from bench.vlm import VLM
from llms.base import IGNORE_INDEX


def peer_benchmark(steps: int = 60, batch_size: int = 16, lr: float = 2e-3, world_scale: float = 1.0,
                   pretrain: dict[str, int] | None = None, seed: int = 0, log=print) -> dict[str, Any]:  # fmt: skip
    from bench.pretrain import pretrain_encoder, pretrain_llm
    from bench.world import World, WorldConfig

    world = World(WorldConfig().scaled(world_scale) if world_scale != 1.0 else WorldConfig())
    pre = pretrain or {}
    enc_path = pretrain_encoder("clip", world, **({"steps": pre["encoder_steps"]} if "encoder_steps" in pre else {}))
    llm_path = pretrain_llm("tinyllama", world, **({"steps": pre["llm_steps"]} if "llm_steps" in pre else {}))
    data = world_dataset(world, "train")
    n = steps * batch_size
    data = Dataset(data.name, data.samples[:n], data.images)
    stage = StageConfig(stage=1, steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=0.05, save_every=10**9,
                        max_grad_norm=1.0)  # fmt: skip

    torch.manual_seed(seed)
    vlm = VLM.build({"name": "clip", "checkpoint": str(enc_path)}, {"name": "mlp2x_gelu"},
                    {"name": "tinyllama", "checkpoint": str(llm_path)})  # fmt: skip
    hf_model, processor = to_llava(vlm.eval())  # the peer starts from identical weights

    # ---- this harness
    t0 = time.perf_counter()
    cache = FeatureCache(vlm.encoder, data.images, with_attention=False, progress=False)
    cache.ensure(sorted({s.image for s in data.samples}))
    cache_seconds = time.perf_counter() - t0
    collator = Collator(vlm.llm, cache, vlm.connector.max_tokens(vlm.encoder.info), None)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(vlm, data, collator, stage, Path(tmp), seed=seed, log=lambda m: None)
        ours = trainer.fit()
        tail = max(1, steps // 10)
        ours["final_loss"] = sum(h["loss"] for h in trainer.history[-tail:]) / tail
        order = [trainer.micro_batch(step, 0) for step in range(steps)]

    # ---- the peer: transformers Trainer on LlavaForConditionalGeneration
    peer = train_peer(hf_model, processor, vlm, data, order, stage, seed)
    result = {
        "steps": steps, "batch_size": batch_size,
        "ours_samples_per_second": ours["train_samples_per_second"], "ours_final_loss": ours["final_loss"],
        "ours_feature_cache_seconds": cache_seconds,
        "peer_samples_per_second": peer["samples_per_second"], "peer_final_loss": peer["final_loss"],
    }  # fmt: skip
    result["speedup"] = result["ours_samples_per_second"] / result["peer_samples_per_second"]
    return result


def train_peer(model, processor, vlm: VLM, data: Dataset, order, stage: StageConfig, seed: int) -> dict[str, Any]:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    n_vis = vlm.encoder.info.num_patches
    image_id = vlm.llm.image_token_id

    def expand(sample) -> dict[str, torch.Tensor]:
        enc = vlm.llm.encode_conversation(sample.messages)
        ids, labels = [], []
        for tok, lab in zip(enc.input_ids, enc.labels):
            reps = n_vis if tok == image_id else 1
            ids += [tok] * reps
            labels += [IGNORE_INDEX if tok == image_id else lab] * reps
        pixel_values = processor.image_processor(images=data.images.load(sample.image), return_tensors="pt")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": pixel_values["pixel_values"][0]}  # fmt: skip

    flat = [s for batch in order for s in batch]  # the same samples in the same order as our run

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(flat)

        def __getitem__(self, i):
            return expand(flat[i])

    def collate(items):
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), vlm.llm.pad_token_id)
        labels = torch.full((len(items), longest), IGNORE_INDEX)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for b, it in enumerate(items):
            k = len(it["input_ids"])
            ids[b, :k], labels[b, :k], mask[b, :k] = it["input_ids"], it["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([it["pixel_values"] for it in items])}  # fmt: skip

    for name, p in model.named_parameters():
        p.requires_grad = "multi_modal_projector" in name  # stage 1: the projector only
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=stage.batch_size, max_steps=stage.steps,
            learning_rate=stage.lr, lr_scheduler_type="cosine", warmup_steps=int(stage.warmup_ratio * stage.steps),
            weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm, logging_steps=1, save_strategy="no",
            report_to=[], seed=seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, remove_unused_columns=False,
        )  # fmt: skip
        trainer = HFTrainer(model=model, args=args, train_dataset=Samples(), data_collator=collate)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(Samples())
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tail = max(1, stage.steps // 10)
    return {"samples_per_second": stage.steps * stage.batch_size / seconds, "final_loss": sum(losses[-tail:]) / tail}
