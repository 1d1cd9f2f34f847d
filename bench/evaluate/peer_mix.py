"""``bench peer --length-mix``: stage 2 on data shaped like LLaVA-1.5's 665K mix, this harness against transformers'
Trainer + ``LlavaForConditionalGeneration`` with and without ``group_by_length``.

The data: ``bench.data.length_mix`` at the encoder's image size (or the user's ``--data llava`` file). Stage 2: the
connector and the whole LLM train, the encoder is frozen; fp32 on both sides; identical initial weights (the peer's
Llava checkpoint is exported from ours and loaded with ``from_pretrained``); AdamW, cosine schedule, the same
learning rate, warm-up, clipping and global batch; no weight decay (LLaVA's).

Three trainers, each in a fresh process (so each one's peak memory is its own), in interleaved rounds:

- ``ours``: ``bench.train.trainer.Trainer``, features from the frozen encoder's cache (built once before training,
  timed apart), packing on (the whole micro-batch one row, attention per sample: ``llms/attention.py``), the LM head
  at labelled positions only (``llms/loss.py``);
- ``hf``: transformers' Trainer on the Llava model, batches padded to their longest sample, the vision tower and the
  image processor run every step;
- ``hf-grouped``: the same with the order transformers' ``LengthGroupedSampler`` gives (what ``group_by_length=True``
  uses; seeded here so that every round sees the same batches).

``ours`` trains on ``hf``'s batches, so their losses must agree at every step (it prints the largest relative gap);
``hf-grouped`` sees other batches (the same samples). Useful tokens are the LLM's input positions that are not padding
(text and visual tokens), the same count for all three; the padding share is the rest of the positions each one
computed. Model GFLOP/s are the FLOPs of the useful work (``FlopCounterMode`` on ours' first step, forward and
backward, scaled by the useful tokens of all steps; the same count for all three, as model-FLOPs utilisation is
reported) per second, against this machine's measured fp32 matrix-multiply rate.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.train.settings import RunConfig, StageConfig
from connector_zoo.settings import check_choice

SIDES = ("ours", "hf-grouped", "hf")


def quiet(_message: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------- orchestration
def length_mix_peer(
    cfg: RunConfig,
    steps: int = 4,
    batch_size: int = 4,
    lr: float = 2e-5,
    rounds: int = 3,
    gradient_checkpointing: bool = False,
    precision: str = "no",
    log=print,
) -> dict[str, Any]:
    """Run the three trainers ``rounds`` times, interleaved; returns per side the figures of every round.
    ``precision``: "no" (fp32) or "bf16" (autocast on every side, fp32 master weights)."""
    from bench.evaluate.peer import PEER_PRECISIONS, matmul_rate

    check_choice("bench peer --length-mix", "precision", precision, PEER_PRECISIONS)

    with tempfile.TemporaryDirectory(prefix="peer-mix-") as tmp:
        tmp = Path(tmp)
        if cfg.data.get("kind", "world") == "world":
            cfg = dataclasses.replace(cfg, data=length_mix_data(cfg, tmp / "data", steps * batch_size + 2))
        cfg = dataclasses.replace(cfg, eval_limit=0)
        stage = StageConfig(
            stage=2,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_ratio=0.03,
            save_every=10**9,
            max_grad_norm=1.0,
            gradient_checkpointing=gradient_checkpointing,
        )
        spec = {
            "config": dataclasses.asdict(cfg),
            "stage": dataclasses.asdict(stage),
            "dir": str(tmp),
            "precision": precision,
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        log("preparing: the model, its Llava export, the batch orders, the FLOPs of one step")
        prep = worker("prepare", spec_path)
        spec_path.write_text(json.dumps({**spec, **prep}))  # every trainer reads the same spec
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for r in range(rounds):
            for side in SIDES:
                runs[side].append(worker(side, spec_path))
                log(f"round {r + 1}/{rounds}, {side}: {runs[side][-1]['seconds']:.1f} s")
    return {
        "steps": steps,
        "batch_size": batch_size,
        "rounds": rounds,
        "precision": precision,
        "samples": steps * batch_size,
        "useful_tokens": prep["useful_tokens"],
        "model_flops": prep["model_flops"],
        "matmul_gflops_per_second": matmul_rate(dtype=PEER_PRECISIONS[precision]) / 1e9,
        "runs": runs,
    }


def length_mix_data(cfg: RunConfig, out: Path, n: int) -> dict[str, Any]:
    from bench.data.length_mix import write_length_mix

    path = write_length_mix(out, n, seed=cfg.seed, image_size=336)  # (each side resizes to its encoder's input)
    return {"kind": "llava", "path": str(path), "image_folder": str(out / "images"), "held_out": 0.0}


def worker(side: str, spec_path: Path) -> dict[str, Any]:
    """One side in a fresh process (``python -m bench.evaluate.peer_mix SIDE SPEC OUT``); its JSON result."""
    out = spec_path.parent / f"{side}.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.evaluate.peer_mix", side, str(spec_path), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
        else:
            why = lines[-1] if lines else f"exit status {proc.returncode}, nothing on stderr"
        raise ValueError(f"the {side} process failed: {why}")
    return json.loads(out.read_text())


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Median and spread (min, max) over rounds of each side's figures, the ratios of ours to each peer per round,
    and the largest relative gap between ours' and hf's loss at any step of any round."""
    runs, useful = result["runs"], result["useful_tokens"]

    def stats(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {}
    for side, rs in runs.items():
        out[side] = {
            "useful_tokens_per_second": stats([useful / r["seconds"] for r in rs]),
            "samples_per_second": stats([result["samples"] / r["seconds"] for r in rs]),
            "padding_share": stats([1 - useful / r["positions"] for r in rs]),
            "peak_rss_gib": stats([r["peak_rss_bytes"] / 2**30 for r in rs]),
            "model_gflops_per_second": stats([result["model_flops"] / r["seconds"] / 1e9 for r in rs]),
            "losses": rs[0]["losses"],
        }
    for peer in ("hf", "hf-grouped"):
        out[f"speedup_vs_{peer}"] = stats([p["seconds"] / o["seconds"] for o, p in zip(runs["ours"], runs[peer])])
        out[f"rss_vs_{peer}"] = stats(
            [o["peak_rss_bytes"] / p["peak_rss_bytes"] for o, p in zip(runs["ours"], runs[peer])]
        )
    out["loss_gap"] = max(
        abs(a - b) / abs(b) for o, p in zip(runs["ours"], runs["hf"]) for a, b in zip(o["losses"], p["losses"])
    )
    return out


# --------------------------------------------------------------------------------------------------- the workers
def load(spec: dict[str, Any]):
    from bench.train.assemble import load_data

    cfg = RunConfig(**spec["config"])
    train, _, _, world = load_data(cfg, quiet)
    return cfg, StageConfig(**spec["stage"]), train, world


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model, export it as Llava (weights and processor), tokenize every sample as the peer sees it (the
    ``<image>`` token expanded to the encoder's patches), choose both orders, count the FLOPs of ours' first step."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from bench.data.features import FeatureCache
    from bench.data.loader import Collator
    from bench.evaluate.peer import peer_tokens
    from bench.train.assemble import build_model
    from bench.train.stage import set_trainable
    from connector_zoo.model.llava import to_llava

    cfg, stage, train, world = load(spec)
    n = stage.steps * stage.batch_size
    if len(train.samples) < n:
        raise ValueError(f"bench peer --length-mix needs {n} training samples; the data has {len(train.samples)}")
    vlm = build_model(cfg, world, quiet)
    tokens = [peer_tokens(vlm, s) for s in train.samples[:n]]
    lengths = [len(ids) for ids, _ in tokens]
    g = torch.Generator().manual_seed(cfg.seed)
    plain = torch.randperm(n, generator=g).tolist()
    grouped = list(
        LengthGroupedSampler(stage.batch_size, lengths=lengths, generator=torch.Generator().manual_seed(cfg.seed))
    )
    cut = lambda order: [order[k : k + stage.batch_size] for k in range(0, n, stage.batch_size)]  # noqa: E731

    # FLOPs of the useful work: ours' first step (packed, LM head at the labels), forward and backward
    from torch.utils.flop_counter import FlopCounterMode

    cache = FeatureCache(vlm.encoder, train.images, with_attention=False)
    collator = Collator(vlm.llm, cache, vlm.connector.max_tokens(vlm.encoder.info), None)
    set_trainable(vlm, stage)
    vlm.train()
    first = [train.samples[i] for i in cut(plain)[0]]
    inputs = collator(first)
    inputs.pack = True
    with FlopCounterMode(display=False) as counter:
        vlm(inputs).loss.backward()
    vlm.zero_grad(set_to_none=True)
    first_tokens = sum(lengths[i] for i in cut(plain)[0])

    hf, processor = to_llava(vlm.eval())
    llava = Path(spec["dir"]) / "llava"
    hf.save_pretrained(llava)
    processor.save_pretrained(llava)
    return {
        "llava": str(llava),
        "tokens": tokens,
        "orders": {"hf": cut(plain), "ours": cut(plain), "hf-grouped": cut(grouped)},
        "useful_tokens": sum(lengths),
        "model_flops": counter.get_total_flops() * sum(lengths) / first_tokens,
    }


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.data.features import FeatureCache
    from bench.data.loader import Collator
    from bench.evaluate.peer import PeakRSS
    from bench.train.assemble import build_model
    from bench.train.trainer import Trainer

    cfg, stage, train, world = load(spec)
    vlm = build_model(cfg, world, quiet)
    order = spec["orders"]["ours"]
    t0 = time.perf_counter()
    cache = FeatureCache(vlm.encoder, train.images, with_attention=False)
    cache.ensure(sorted({train.samples[i].image for batch in order for i in batch} - {None}))
    cache_seconds = time.perf_counter() - t0
    collator = Collator(vlm.llm, cache, vlm.connector.max_tokens(vlm.encoder.info), None)
    positions: list[int] = []
    vlm.register_forward_hook(lambda module, args, out: positions.append(int(out.positions)))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            vlm,
            train,
            collator,
            stage,
            Path(tmp),
            seed=cfg.seed,
            log=quiet,
            num_workers=0,
            pack=True,
            autocast=spec["precision"],
        )
        trainer.micro_indices = lambda step, micro: order[step]  # hf's batches, in hf's order
        with PeakRSS() as peak:
            trainer.fit()
    return {
        "seconds": trainer.train_seconds,
        "losses": [h["loss"] for h in trainer.history],
        "positions": sum(positions),
        "peak_rss_bytes": peak.peak,
        "feature_cache_seconds": cache_seconds,
    }


def run_hf(spec: dict[str, Any], side: str) -> dict[str, Any]:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from bench.evaluate.peer import PeakRSS, hf_fit, pad_collate

    cfg, stage, train, _ = load(spec)
    model = LlavaForConditionalGeneration.from_pretrained(spec["llava"], dtype=torch.float32)
    processor = LlavaProcessor.from_pretrained(spec["llava"])
    pad_id = model.config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    for name, p in model.named_parameters():
        p.requires_grad = "vision_tower" not in name  # stage 2: projector and LLM
    flat = [i for batch in spec["orders"][side] for i in batch]
    positions: list[int] = []

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(flat)

        def __getitem__(self, k):
            i = flat[k]
            ids, labels = spec["tokens"][i]
            item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
            image = train.samples[i].image
            if image is not None:
                item["pixel_values"] = processor.image_processor(images=train.images.load(image), return_tensors="pt")[
                    "pixel_values"
                ][0]
            return item

    def collate(items):
        positions.append(max(len(it["input_ids"]) for it in items) * len(items))
        return pad_collate(items, pad_id)

    with PeakRSS() as peak:
        seconds, losses = hf_fit(model, Samples(), collate, stage, cfg.seed, spec["precision"])
    return {"seconds": seconds, "losses": losses, "positions": sum(positions), "peak_rss_bytes": peak.peak}


def main(argv: list[str]) -> None:
    from connector_zoo.io import keep_freed_memory

    keep_freed_memory()  # every side alike, as the bench command that starts them
    side, spec_path, out = argv
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(0)
    if side == "prepare":
        result = prepare(spec)
    elif side == "ours":
        result = run_ours(spec)
    else:
        result = run_hf(spec, side)
    from connector_zoo.io import write_json

    write_json(out, result)


if __name__ == "__main__":
    main(sys.argv[1:])
