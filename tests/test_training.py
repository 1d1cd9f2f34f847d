"""The training path a GPU user takes: mixed precision, half backbones with fp32 master weights, gradient
checkpointing, LoRA, the global batch, and checkpoints that do not duplicate bytes."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from accelerate.utils import convert_outputs_to_fp32
from conftest import CONV_A, CONV_B, MICRO, batch, bench, computed, images

from bench.train.precision import resolve_backbone_dtype
from bench.train.recipes import RECIPES
from bench.train.settings import StageConfig
from bench.train.stage import parameter_groups, set_trainable
from connector_zoo.model.precision import resolve_precision
from connector_zoo.model.vlm import VLM, VLMOutput
from connector_zoo.settings import SettingError
from connectors import CONNECTORS


def tiny_vlm(llm: str = "tinyllama", **llm_settings) -> VLM:
    torch.manual_seed(0)
    return VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": llm, **llm_settings})


def test_the_output_keeps_every_field_through_accelerate_fp32_conversion():
    """accelerate rebuilds the output under mixed precision; undeclared attributes were lost (issue 9)."""
    out = VLMOutput(
        loss=torch.tensor(2.0, dtype=torch.bfloat16),
        lm_loss=torch.tensor(1.5, dtype=torch.bfloat16),
        logits=torch.ones(1, 2, 3, dtype=torch.bfloat16),
        visual_tokens=torch.tensor([4]),
    )
    back = convert_outputs_to_fp32(lambda: out)()
    assert back.lm_loss.dtype == torch.float32 and back.lm_loss.item() == 1.5 and back.loss.item() == 2.0
    assert back.visual_tokens.tolist() == [4] and back.logits.dtype == torch.float32


def test_precision_and_backbone_dtype_resolution():
    assert resolve_precision("auto", cuda=False) == "no" and resolve_precision("fp16", cuda=False) == "bf16"
    assert resolve_precision("bf16", cuda=False) == "bf16" and resolve_precision("fp32", cuda=False) == "no"
    assert resolve_backbone_dtype("auto", "bf16", cuda=False) == "fp32"
    assert resolve_backbone_dtype("auto", "bf16", cuda=True) == "bf16"
    with pytest.raises(ValueError, match="needs mixed precision"):
        resolve_backbone_dtype("bf16", "no")
    with pytest.raises(ValueError, match="--precision must be"):
        resolve_precision("half")


def test_half_backbones_train_fp32_master_weights():
    vlm = tiny_vlm(dtype="bfloat16")
    assert vlm.llm.model.get_input_embeddings().weight.dtype == torch.bfloat16
    params = set_trainable(vlm, StageConfig(stage=2))
    assert params and all(p.dtype == torch.float32 for p in params)  # the full LLM, upcast for training
    lora = tiny_vlm(dtype="bfloat16")
    params = set_trainable(lora, StageConfig(stage=2, lora={"r": 4, "alpha": 8}))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("connector.") for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    base = lora.llm.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.dtype == torch.bfloat16 and not base.requires_grad  # the frozen base stays in half


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        vlm = tiny_vlm()
        set_trainable(vlm, StageConfig(stage=2, gradient_checkpointing=checkpointing))
        vlm.train()
        inputs = batch(vlm.llm, [CONV_A, CONV_B], [True, True], vlm.encoder.preprocess(images(2)))
        out = vlm(inputs)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
        model = vlm.llm.model
        on = getattr(model, "is_activation_checkpointing", None)
        results.append((out.loss.detach(), grads, model.is_gradient_checkpointing if on is None else on))
    (loss_a, grads_a, on_a), (loss_b, grads_b, on_b) = results
    assert not on_a and on_b  # it really was on in the second pass
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("llm.") for k in grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-7)


def test_connector_learning_rate_is_its_own_group():
    vlm = tiny_vlm()
    cfg = StageConfig(stage=2, lr=2e-4, connector_lr=2e-5, lora={"r": 4})
    groups = parameter_groups(vlm, set_trainable(vlm, cfg), cfg)
    by_name = {g["name"]: g for g in groups}
    assert by_name["connector"]["lr"] == 2e-5 and by_name["llm"]["lr"] == 2e-4
    assert {id(p) for p in by_name["connector"]["params"]} == {id(p) for p in vlm.connector.parameters()}


def test_the_fused_adamw_steps_as_torchs_default_loop_does():
    """``adamw`` picks torch's fused kernel for plain CPU parameters; over a few steps with two rate groups and weight
    decay it moves every parameter as the default per-parameter AdamW does (to float rounding), and it falls back to the
    default for parameters it cannot fuse (an integer tensor stands in for any such one)."""
    from bench.train.trainer import adamw

    vlm = tiny_vlm()
    cfg = StageConfig(stage=2, lr=2e-3, connector_lr=5e-3, weight_decay=0.05)
    params = set_trainable(vlm, cfg)
    start = [p.detach().clone() for p in params]
    moved = []
    for fused in (True, False):
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        groups = parameter_groups(vlm, params, cfg)
        opt = (
            adamw(groups, cfg.lr, cfg.weight_decay)
            if fused
            else torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        )
        assert opt.defaults["fused"] is (True if fused else None)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            opt.zero_grad()
        moved.append([p.detach().clone() for p in params])
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(moved[0], start))  # the steps moved the weights
    for a, b in zip(*moved):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    odd = [
        {
            "params": [
                torch.nn.Parameter(torch.zeros(2)),
                torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False),
            ]
        }
    ]
    assert adamw(odd, 1e-3, 0.0).defaults["fused"] is None


@pytest.mark.parametrize(
    "connector,rates", [("mlp2x_gelu", (2e-3, 2e-5)), ("c_abstractor", (1e-4, 2e-5)), ("tokenpacker", (1e-3, 2e-5))]
)
def test_paper_connector_rate_is_the_papers_per_stage(connector, rates):
    """``connector_lr="paper"`` (recipe ``mini-paper-rates``): LLaVA-1.5's projector rates (2e-3 / 2e-5), Honeybee's
    pretrain / finetune yaml for the C-Abstractor (1e-4 / 2e-5), TokenPacker's scripts (1e-3 / 2e-5); the LLM keeps
    the stage's ``lr``."""
    torch.manual_seed(0)
    vlm = VLM.build(
        {"name": "clip"},
        {"name": connector, **CONNECTORS.get(connector).small_settings}
        if connector != "mlp2x_gelu"
        else {"name": connector},
        {"name": "tinyllama"},
    )
    for stage, rate in zip((1, 2), rates):
        cfg = StageConfig(stage=stage, lr=2e-3, connector_lr="paper")
        by_name = {g["name"]: g["lr"] for g in parameter_groups(vlm, set_trainable(vlm, cfg), cfg)}
        assert by_name["connector"] == rate and by_name.get("llm", 2e-3) == 2e-3
    assert [s["connector_lr"] for s in RECIPES["mini-paper-rates"]] == ["paper", "paper"]
    # the pretrained level's row at the papers' rates: the level's stages, only the connector's rate other
    level, paper = RECIPES["mini-smollm2"], RECIPES["mini-smollm2-paper-rates"]
    assert [{**s, "connector_lr": "paper"} for s in level] == paper
    with pytest.raises(SettingError, match="connector_lr"):
        StageConfig(stage=2, connector_lr="papers")


def test_global_batch_sets_the_accumulation():
    stage = StageConfig(batch_size=16, global_batch=128)
    stage.resolve_accumulation(8)
    assert stage.grad_accum == 1
    stage.resolve_accumulation(1)
    assert stage.grad_accum == 8
    with pytest.raises(ValueError, match="not a multiple"):
        StageConfig(batch_size=16, global_batch=100).resolve_accumulation(1)


def test_qlora_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="QLoRA .* needs a CUDA GPU"):
        tiny_vlm(quantization="nf4")


def test_lora_export_merges_the_adapters(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from connector_zoo.model.llava import export_hf

    vlm = tiny_vlm(lora={"r": 4, "alpha": 8, "dropout": 0.0})
    with torch.no_grad():
        for p in vlm.llm.lora_parameters():
            p.normal_(0, 0.2)  # adapters that change the output (lora_B starts at zero)
    vlm.eval()
    inputs = batch(vlm.llm, [CONV_A], [True], vlm.encoder.preprocess(images(1)))
    with torch.no_grad():
        ours = vlm(inputs, full_logits=True).logits
    export_hf(vlm, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    ids = inputs.input_ids[0]
    p = int((ids == vlm.llm.image_token_id).nonzero())
    n = vlm.encoder.info.num_patches
    expanded = torch.cat([ids[:p], torch.full((n,), vlm.llm.image_token_id), ids[p + 1 :]])[None]
    with torch.no_grad():
        theirs = hf(input_ids=expanded, pixel_values=inputs.pixel_values).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- whole runs
LORA_BF16 = ["--precision", "bf16", "--backbone-dtype", "bf16", "--lora", "r=8,alpha=16", "--gradient-checkpointing"]


@pytest.fixture(scope="module")
def bf16_lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bf16-lora"
    proc = bench([*MICRO, *LORA_BF16, "--out", str(out), "--save-every", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_bf16_lora_run_records_precision_memory_and_adapters(bf16_lora_run):
    results = json.loads((bf16_lora_run / "results.json").read_text())
    assert results["precision"] == {"compute": "bf16", "backbone": "bf16"}
    stage1, stage2 = results["memory"]
    assert stage2["trainable_parameters_bytes"] == 4 * results["parameters"]["trainable"]  # fp32 master weights
    assert stage2["optimizer_state_bytes"] >= 2 * stage2["trainable_parameters_bytes"]  # AdamW: two fp32 moments
    assert stage2["parameters_bytes"] < 4 * results["parameters"]["total"]  # the frozen base is held in bf16
    assert results["training"][1]["lora"]["r"] == 8 and results["training"][1]["gradient_checkpointing"]
    spec = json.loads((bf16_lora_run / "vlm_config.json").read_text())
    assert spec["llm"]["lora"]["r"] == 8 and spec["llm"]["dtype"] == "bfloat16"
    # best and last of the final step, and the run's own weights, are one file on disk
    last, best = (
        bf16_lora_run / "stage2" / n / "trainable.safetensors" for n in ("checkpoint-last", "checkpoint-best")
    )
    assert os.stat(last).st_ino == os.stat(best).st_ino == os.stat(bf16_lora_run / "trainable.safetensors").st_ino
    assert os.stat(last).st_size < 1_000_000  # adapters + connector only, not the LLM


@pytest.mark.slow
def test_a_killed_bf16_lora_run_resumes_to_the_same_numbers(bf16_lora_run, tmp_path):
    killed = tmp_path / "killed"
    proc = bench(
        [*MICRO, *LORA_BF16, "--out", str(killed), "--save-every", "2"], env={"CONNECTOR_ZOO_KILL_AT": "step:2:5"}
    )
    assert proc.returncode != 0 and not (killed / "results.json").exists()
    proc = bench(["run", "--resume", str(killed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 4/6 from" in proc.stdout and "stage2" in proc.stdout
    a = json.loads((bf16_lora_run / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert computed(b["loss_history"]) == computed(a["loss_history"])
    assert b["metrics"]["test"]["caption_loss"] == a["metrics"]["test"]["caption_loss"]
    assert b["metrics"]["test"]["accuracy"] == a["metrics"]["test"]["accuracy"]


@pytest.mark.slow
def test_eval_generate_prune_curve_and_export_work_on_a_bf16_lora_run(bf16_lora_run, tmp_path):
    results = json.loads((bf16_lora_run / "results.json").read_text())
    proc = bench(["eval", str(bf16_lora_run), "--eval-limit", "8"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the same loss as the run recorded: the run's precision and the adapters are restored
    assert f"test: caption_loss {results['metrics']['test']['caption_loss']:.4f}" in proc.stdout
    images(1)[0].save(tmp_path / "a.png")
    proc = bench(
        [
            "generate",
            str(bf16_lora_run),
            "--image",
            str(tmp_path / "a.png"),
            "--prompt",
            "Colour?",
            "--max-new-tokens",
            "2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = bench(
        ["prune-curve", str(bf16_lora_run), "--ratios", "1,0.5", "--eval-limit", "4", "--out", str(tmp_path / "curve")]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = bench(["export-hf", "--run", str(bf16_lora_run), "--out", str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "lora" not in json.dumps(weights)  # merged: a plain Llava model


@pytest.mark.slow
def test_bf16_and_fp32_runs_agree(bf16_lora_run, tmp_path):
    """The same micro run in fp32 and under bf16 autocast with bf16 backbones: losses agree to bf16's precision."""
    common = [*MICRO, "--lora", "r=8,alpha=16"]
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        extra = ["--backbone-dtype", "bf16"] if precision == "bf16" else []
        proc = bench([*common, "--precision", precision, *extra, "--out", str(out), "--profile"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[precision] = json.loads((out / "results.json").read_text())
    fp32, bf16 = runs["no"], runs["bf16"]
    for a, b in zip(fp32["loss_history"], bf16["loss_history"]):
        for x, y in zip(a, b):
            assert abs(x["loss"] - y["loss"]) <= 0.02 * abs(x["loss"]), (x, y)  # bf16: 8 bits of mantissa
    x, y = fp32["metrics"]["test"]["caption_loss"], bf16["metrics"]["test"]["caption_loss"]
    assert abs(x - y) <= 0.02 * x and bf16["efficiency"]["flops"]["llm_prefill"] > 0


def test_init_connector_takes_another_runs_projector(tmp_path):
    trained = tiny_vlm()
    with torch.no_grad():
        for p in trained.connector.parameters():
            p.normal_()
    trained.save(tmp_path / "stage1")
    fresh = tiny_vlm()
    fresh.load_connector(tmp_path / "stage1")
    for a, b in zip(trained.connector.state_dict().values(), fresh.connector.state_dict().values()):
        assert torch.equal(a, b)
    other = VLM.build({"name": "clip"}, {"name": "linear"}, {"name": "tinyllama"})
    with pytest.raises(ValueError, match="does not fit this model's connector"):
        other.load_connector(tmp_path / "stage1")


@pytest.mark.parametrize("name", ["accelerate_ddp", "accelerate_fsdp", "accelerate_deepspeed_zero2"])
def test_accelerate_configs_load_with_accelerates_own_loader(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    assert (
        config.distributed_type.value
        == {"accelerate_ddp": "MULTI_GPU", "accelerate_fsdp": "FSDP", "accelerate_deepspeed_zero2": "DEEPSPEED"}[name]
    )


def test_plan_counts_vicuna_7b_exactly_and_its_arithmetic_by_hand():
    from bench.train.plan import count, memory

    c = count("clip", "openai/clip-vit-large-patch14-336", {"name": "mlp2x_gelu"}, "vicuna", "lmsys/vicuna-7b-v1.5")
    assert c.llm == 6_738_415_616  # Llama-2-7B / Vicuna-7B's published parameter count
    assert c.connector == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # LLaVA-1.5's 21 M projector
    assert c.visual_tokens == 576 and c.encoder_tokens == 577
    # LoRA on every linear layer: q, k, v, o (4096 -> 4096) and gate, up, down (4096 <-> 11008), 32 layers
    assert c.lora_per_rank == 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    m = memory(c, stage=2, batch=1, text_tokens=0, backbone="bf16", devices=8, checkpointing=True, shard="zero2")
    trainable = c.connector + c.llm
    assert m["weights"] == 2 * c.encoder + 4 * trainable  # frozen encoder in bf16, fp32 master weights
    assert m["gradients"] == 4 * trainable / 8 and m["optimizer"] == 8 * trainable / 8  # sharded over 8
    s = 576
    assert m["activations"] == 32 * 4 * s * 4096 + 2 * s * (6 * 4096 + 2 * 4096 + 4 * 11008) + 6 * s * 32000


def test_summary_prints_slow_throughput_with_significant_digits():
    from bench.run.record import summary

    results = {
        "config": {
            "encoder": {"name": "clip"},
            "connector": {"name": "mlp2x_gelu"},
            "llm": {"name": "vicuna"},
            "recipe": "llava-1.5-pretrain",
            "seed": 0,
        },
        "metrics": {},
        "visual_tokens_per_image": {},
        "parameters": {"trainable": 1, "total": 2},
        "train_samples_per_second": 0.0561,
        "encoder_forwards": 0,
        "skipped_samples": [],
        "wall_time_seconds": 1.0,
    }
    assert "train 0.0561 samples/s" in summary(results)  # it printed "train 0 samples/s" at real width


def test_validation_loss_reads_the_held_out_images(tmp_path):
    """The world's val split has its own image table; sample i of it is not image i of the training table. The
    recorded validation loss must be the loss on the val images (it was computed on training images of the same
    index before: 1.5 against a training loss of 0.2 on the default run)."""
    from bench.train.assemble import feature_sources, load_data
    from bench.train.settings import RunConfig
    from bench.train.trainer import validation_loss

    out = bench([*MICRO, "--out", str(tmp_path / "run")])
    assert out.returncode == 0, out.stderr[-2000:]
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())["training"][-1]["best_val_loss"]
    cfg = RunConfig.from_file(tmp_path / "run" / "config.json")
    train, val, _, _ = load_data(cfg, lambda m: None)
    assert train.images.key != val.images.key and len(val.samples) > 1
    vlm = VLM.load(tmp_path / "run").eval()
    _, collators, _ = feature_sources(cfg, vlm, [train, val], lambda m: None)
    right = validation_loss(vlm, val, collators[val.images.key], batch_size=4)
    assert recorded == pytest.approx(right, rel=1e-6, abs=1e-6)
    # the test can tell the two apart: the same weights on the training images of the same indices
    as_before = dataclasses.replace(val, images=train.images)
    assert abs(validation_loss(vlm, as_before, collators[train.images.key], batch_size=4) - right) > 1e-5
    with pytest.raises(ValueError, match="needs the collator of its image table"):
        validation_loss(vlm, val, collators[train.images.key], batch_size=4)


def test_the_loss_history_and_log_give_the_llm_and_the_connector_rate(tmp_path):
    """With ``connector_lr`` the history's ``lr`` is the LLM's (the recipe's lr) and ``connector_lr`` the connector's,
    in the same schedule (ratio 10 at every step); without it there is one rate. (A VLM of its own: stage 2 unfreezes
    its LLM, which must not be the session's shared one.)"""
    from bench.data.formats import Dataset, Sample
    from bench.data.loader import Collator
    from bench.train.trainer import Trainer

    ds = Dataset(
        "t",
        [
            Sample(f"s{i}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}])
            for i in range(8)
        ],
        images=None,
    )
    for connector_lr in (2e-3, None):
        vlm = tiny_vlm()
        collator = Collator(vlm.llm, None, visual_budget=0, max_length=None)
        cfg = StageConfig(stage=2, steps=3, batch_size=2, lr=2e-4, connector_lr=connector_lr, warmup_ratio=0.5)
        lines = []
        trainer = Trainer(vlm, ds, collator, cfg, tmp_path / str(connector_lr), seed=0, log=lines.append)
        trainer.fit()
        history = trainer.history
        assert len(history) == 3 and history[0]["lr"] != history[-1]["lr"]  # the schedule moves
        if connector_lr:
            assert all(h["connector_lr"] == pytest.approx(10 * h["lr"]) for h in history)
            assert any(f"lr {history[-1]['lr']:.2e} (connector {history[-1]['connector_lr']:.2e})" in m for m in lines)
        else:
            assert all("connector_lr" not in h for h in history)
            assert not any("(connector" in m for m in lines)


def test_a_stage_validates_on_its_val_limit_samples(tmp_path):
    """``val_limit`` bounds the held-out samples of a stage's validation loss: the recorded loss is the mean over the
    first ``val_limit`` of them, and differs from the loss over all (the samples are of different difficulty)."""
    from bench.data.formats import Dataset, Sample
    from bench.data.loader import Collator
    from bench.train.trainer import Trainer, validation_loss

    def data(name, answers):
        return Dataset(
            name,
            [
                Sample(f"{name}{i}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}])
                for i, a in enumerate(answers)
            ],
            images=None,
        )

    train = data("t", ["a b"] * 8)
    val = data("v", ["a b", "a b", "c d e f g", "h i j k l m n"])
    vlm = tiny_vlm()
    collator = Collator(vlm.llm, None, visual_budget=0, max_length=None)
    cfg = StageConfig(stage=2, steps=2, batch_size=2, lr=2e-4, val_limit=2)
    trainer = Trainer(vlm, train, collator, cfg, tmp_path / "run", seed=0, val=val, log=lambda m: None)
    trainer.fit()
    recorded = trainer.history[-1]["val_loss"]
    vlm.eval()
    assert recorded == pytest.approx(validation_loss(vlm, val, collator, 2, limit=2), rel=1e-5)
    assert abs(recorded - validation_loss(vlm, val, collator, 2, limit=4)) > 1e-3
    # and it builds no autograd graph (it lost its no_grad once, when a function was put between them)
    modes = []
    vlm.register_forward_pre_hook(lambda module, args: modes.append(torch.is_grad_enabled()))
    validation_loss(vlm, val, collator, 2)
    assert modes and not any(modes)


def test_a_stage_says_each_groups_rate_when_they_differ():
    """The stage's first log line names the rate each optimizer group trains at: one figure when all agree, else each
    group's (``connector_lr="paper"`` puts stage 1's connector at its paper's rate under the recipe's ``lr``)."""
    from types import SimpleNamespace

    from bench.run.job import group_rates

    torch.manual_seed(0)
    small = CONNECTORS.get("c_abstractor").small_settings
    vlm = VLM.build({"name": "clip"}, {"name": "c_abstractor", **small}, {"name": "tinyllama"})
    said = {}
    for stage, rate in ((1, "paper"), (2, "paper"), (2, None)):
        cfg = StageConfig(stage=stage, lr=2e-3, connector_lr=rate)
        groups = parameter_groups(vlm, set_trainable(vlm, cfg), cfg)
        said[stage, rate] = group_rates(SimpleNamespace(optimizer=torch.optim.AdamW(groups)))
    assert said == {(1, "paper"): "lr 0.0001", (2, "paper"): "lr: connector 2e-05, llm 0.002", (2, None): "lr 0.002"}
