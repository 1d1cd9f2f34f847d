"""The named training recipes (``--recipe``): the source notes' settings for real-size runs, and the short ones of
the mini world. A recipe lists stages (``bench/train/stage.py``'s ``StageConfig`` fields); per-device batch x
accumulation x processes gives the global batch of the notes."""

from __future__ import annotations

from typing import Any

#: the pretrained world level's stages (docs/pretrained-world.md, run B): LLaVA's split of the data, stage 1 (the
#: connector alone) on the captions, stage 2 (the connector and the LLM) on the questions, at LLaVA's low rate for a
#: pretrained LLM and the connector at half stage 1's. The validation loss at each stage's end over 400 held-out
#: samples, not 2,000 (a logged figure; over 2,000 it cost 4-5 minutes a stage at this level); a checkpoint every 25
#: steps, since a stage-2 step costs ~10 s and a killed run resumes from the last one.
SMOLLM2_STAGE1: dict[str, Any] = dict(
    stage=1, steps=150, batch_size=16, lr=2e-3, warmup_ratio=0.05, save_every=25, val_limit=400, data="captions"
)
SMOLLM2_STAGE2: dict[str, Any] = dict(
    stage=2,
    steps=150,
    batch_size=16,
    lr=5e-5,
    connector_lr=1e-3,
    warmup_ratio=0.05,
    save_every=25,
    val_limit=400,
    data="questions",
)

RECIPES: dict[str, list[dict[str, Any]]] = {
    # the mini world on 2 CPU cores: a short stage 1 (connector only) then a short stage 2 (connector + LLM); see
    # docs/training.md: the frozen 4-layer world LLM alone does not reach useful accuracy in minutes
    "mini": [
        dict(stage=1, steps=300, batch_size=32, lr=2e-3, warmup_ratio=0.05, save_every=100),
        dict(stage=2, steps=1200, batch_size=32, lr=2e-3, warmup_ratio=0.05, save_every=100),
    ],
    # `mini` with each connector trained at its paper's rates (Connector.paper_lr; LLaVA-1.5's 2e-3 / 2e-5 unless the
    # paper differs: Honeybee's C-Abstractor 1e-4 / 2e-5, TokenPacker 1e-3 / 2e-5) and the world LLM at mini's 2e-3
    # in stage 2 (docs/mini-world.md: why c_abstractor and tokenpacker lose colour under mini, issue 31)
    "mini-paper-rates": [
        dict(stage=1, steps=300, batch_size=32, lr=2e-3, connector_lr="paper", warmup_ratio=0.05, save_every=100),
        dict(stage=2, steps=1200, batch_size=32, lr=2e-3, connector_lr="paper", warmup_ratio=0.05, save_every=100),
    ],
    # --world-llm smollm2 (pretrained SmolLM2-135M, 30 layers; its default recipe, with --qa-turns 7 --train-questions 7
    # --qa-branches): fewer and smaller steps than `mini`, each ~10x its cost
    "mini-smollm2": [dict(SMOLLM2_STAGE1), dict(SMOLLM2_STAGE2)],
    # the two published directions the pretrained level tests by recipe (docs/pretrained-world.md): Prismatic's
    # single-stage training (stage 2 alone, the same 150 steps), and LLaVA's frozen LLM against a fine-tuned one (the
    # same two stages of data, the second training the connector alone at the rate stage 2 gives it)
    "mini-smollm2-stage2-only": [dict(SMOLLM2_STAGE2)],
    # stage 2 alone for as many steps (and samples) as the two stages together: the stage skipped, not its steps
    "mini-smollm2-stage2-only-300": [{**SMOLLM2_STAGE2, "steps": 300}],
    # the level with each connector at its paper's rates in both stages (Connector.paper_lr, as `mini-paper-rates`;
    # the LLM at the level's 5e-5): the row beside the shared recipe for the connectors whose papers train them
    # slower (C-Abstractor 1e-4 / 2e-5, TokenPacker 1e-3 / 2e-5), which the level's 2e-3 / 1e-3 may overshoot
    "mini-smollm2-paper-rates": [
        {**SMOLLM2_STAGE1, "connector_lr": "paper"},
        {**SMOLLM2_STAGE2, "connector_lr": "paper"},
    ],
    "mini-smollm2-frozen-llm": [
        dict(SMOLLM2_STAGE1),
        {**{k: v for k, v in SMOLLM2_STAGE2.items() if k != "connector_lr"}, "stage": 1, "lr": 1e-3},
    ],
    # a third of `mini`'s steps, for the resolution sweep (issue 38): a tiled image there is 10 views, and a tiled
    # `linear` feeds 664 visual tokens a sample, ~5x an untiled step's cost (docs/zoo.md, high resolution)
    "mini-short": [
        dict(stage=1, steps=100, batch_size=32, lr=2e-3, warmup_ratio=0.05, save_every=50),
        dict(stage=2, steps=400, batch_size=32, lr=2e-3, warmup_ratio=0.05, save_every=50),
    ],
    "mini-stage1": [dict(stage=1, steps=1000, batch_size=32, lr=2e-3, warmup_ratio=0.05, save_every=100)],
    # for --world-llm wide: stage 2 trains the LLM 10x slower than the connector, as LLaVA's stage 2 keeps the LLM's
    # rate low, so that the yes/no checking the wide LLM learnt from text survives (docs/mini-world.md, the world's
    # ceiling)
    "mini-wide": [
        dict(stage=1, steps=300, batch_size=32, lr=2e-3, warmup_ratio=0.05, save_every=100),
        dict(stage=2, steps=1200, batch_size=32, lr=2e-4, connector_lr=2e-3, warmup_ratio=0.05, save_every=100),
    ],
    # LLaVA-1.5 (MISSION.md): stage 1 lr 2e-3, global batch 128, 1 epoch; stage 2 lr 2e-5, global batch 32 (LLaVA v1
    # notes), 3 epochs; cosine, 3 % warm-up, bf16 on GPUs
    # (global_batch: the accumulation is derived from the per-device batch and the number of processes)
    "llava-1.5-pretrain": [
        dict(stage=1, epochs=1, batch_size=16, global_batch=128, lr=2e-3, warmup_ratio=0.03, save_every=1000)
    ],
    "llava-1.5-finetune": [
        dict(
            stage=2,
            epochs=3,
            batch_size=4,
            global_batch=32,
            lr=2e-5,
            warmup_ratio=0.03,
            save_every=1000,
            gradient_checkpointing=True,
            group_by_length=True,  # finetune.sh: --group_by_modality_length True
        )
    ],
    # LLaVA-1.5's finetune_lora.sh: LoRA r 128, alpha 256 on every linear layer of the LLM, lr 2e-4 with the
    # projector at 2e-5, global batch 128, 1 epoch, gradient checkpointing
    "llava-1.5-finetune-lora": [
        dict(
            stage=2,
            epochs=1,
            batch_size=16,
            global_batch=128,
            lr=2e-4,
            connector_lr=2e-5,
            warmup_ratio=0.03,
            save_every=1000,
            gradient_checkpointing=True,
            group_by_length=True,  # finetune_lora.sh: --group_by_modality_length True
            lora=dict(r=128, alpha=256, dropout=0.05),
        )
    ],
    # "LLaVA on a budget": batch 2, accumulation 4, lr 2e-4, 350 steps, cosine to 2e-5, 5 % warm-up, fp16
    "budget": [
        dict(
            stage=2, steps=350, batch_size=2, grad_accum=4, lr=2e-4, min_lr_ratio=0.1, warmup_ratio=0.05, save_every=50
        )
    ],
    # MiniGPT-4: ~20k steps at batch 256 training only the linear layer after a frozen Q-Former, then 400 steps at
    # batch 12 on curated pairs
    "minigpt4-stage1": [
        dict(stage=1, steps=20000, batch_size=32, grad_accum=8, lr=1e-4, warmup_ratio=0.025, save_every=1000)
    ],
    "minigpt4-stage2": [dict(stage=1, steps=400, batch_size=12, lr=3e-5, warmup_ratio=0.05, save_every=100)],
}
