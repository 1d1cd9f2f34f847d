"""``--shard full``: FSDP2 (``fully_shard``) over 2 CPU processes (gloo), against the same run in one process.

The stages give a global batch of 4 (2 a process with 2 processes, 2 micro-batches of 2 with one), so both see the same
samples in every optimizer step. Stage 1 trains the connector alone (replicated); stage 2 trains the LLM too, sharded.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import bench, computed
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CONFIG = """\
world_scale: 0.01
pretrain_steps: 3
connector: mlp2x_gelu
llm: tinyllama
eval_limit: 8
stages:
  - {stage: 1, steps: 4, batch_size: 2, global_batch: 4, lr: 0.002, save_every: 2}
  - {stage: 2, steps: 6, batch_size: 2, global_batch: 4, lr: 0.002, save_every: 2}
"""
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# fp32 sums of the same gradients in another order (a reduce-scatter against one process's accumulation)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    (root / "run.yaml").write_text(CONFIG)
    one = bench(["run", "--config", str(root / "run.yaml"), "--out", str(root / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    args = ["run", "--config", str(root / "run.yaml"), "--shard", "full", "--out", str(root / "two")]
    two = bench(args, launcher=TWO)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, one, two


def results(run) -> dict:
    return json.loads((run / "results.json").read_text())


def close(a: list[list[dict]], b: list[list[dict]], key: str) -> bool:
    return all(
        abs(x[key] - y[key]) <= TOLERANCE * max(1.0, abs(x[key])) for sa, sb in zip(a, b) for x, y in zip(sa, sb)
    ) and [len(s) for s in a] == [len(s) for s in b]


def test_two_sharded_processes_hold_half_each_and_train_as_one_process(runs):
    root, _, two = runs
    assert "sharded (FSDP2) over 2 processes: 2 decoder layers + the rest" in two.stdout
    one, sharded = results(root / "one"), results(root / "two")
    # stage 2's bytes a process holds, measured on its local shards (uneven shards: dim 0 of an odd size)
    mem_one, mem_two = one["training"][1]["memory"], sharded["training"][1]["memory"]
    for key in ("parameters_bytes", "gradients_bytes", "optimizer_state_bytes"):
        assert 0.45 <= mem_two[key] / mem_one[key] <= 0.55, (key, mem_two[key], mem_one[key])
    assert mem_one["gradients_bytes"] > 0
    assert close(one["loss_history"], sharded["loss_history"], "loss")
    assert close(one["loss_history"], sharded["loss_history"], "grad_norm")
    wa, wb = (load_file(str(root / name / "trainable.safetensors")) for name in ("one", "two"))
    assert wa.keys() == wb.keys() and any(k.startswith("llm.") for k in wa)
    assert all(torch.allclose(wa[k], wb[k], atol=TOLERANCE) for k in wa)
    # the checkpoint written from the shards is an unsharded run's: weights whole, optimizer state by parameter name
    extra = torch.load(root / "two" / "stage2" / "checkpoint-last" / "optimizer.pt", weights_only=True)
    names = {p for g in extra["optimizer"]["param_groups"] for p in g["params"]}
    assert names == set(extra["optimizer"]["state"]) and "connector.layers.0.weight" in names


def test_a_killed_sharded_run_resumes_sharded_or_in_one_process_to_the_same_numbers(runs):
    root, _, _ = runs
    killed = root / "killed"
    args = ["run", "--config", str(root / "run.yaml"), "--shard", "full", "--out", str(killed)]
    proc = bench(args, env={"CONNECTOR_ZOO_KILL_AT": "step:2:5"}, launcher=TWO)
    assert proc.returncode != 0  # SIGKILL in stage 2, after step 5
    assert json.loads((killed / "stage2" / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 4
    alone = root / "alone"
    shutil.copytree(killed, alone)
    again = bench(["run", "--resume", str(killed)], launcher=TWO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step 4/6" in again.stdout
    reference = results(root / "two")
    assert computed(results(killed)["loss_history"]) == computed(reference["loss_history"])
    wa, wb = load_file(str(root / "two" / "trainable.safetensors")), load_file(str(killed / "trainable.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same checkpoint resumed by one unsharded process (2 micro-batches a step): the same curve, to fp32 order
    single = bench(["run", "--resume", str(alone)])
    assert single.returncode == 0, single.stderr[-3000:]
    assert "resumed at step 4/6" in single.stdout
    assert close(results(alone)["loss_history"], reference["loss_history"], "loss")


def test_a_sharded_run_exports_the_logits_of_the_one_process_run(runs, tmp_path):
    from transformers import LlavaForConditionalGeneration

    root, _, _ = runs
    logits = []
    for name in ("one", "two"):
        proc = bench(["export-hf", "--run", str(root / name), "--out", str(tmp_path / name)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        model = LlavaForConditionalGeneration.from_pretrained(tmp_path / name).eval()
        torch.manual_seed(0)
        pixels = torch.rand(1, 3, 64, 64)
        n = model.config.image_seq_length
        ids = torch.tensor([[1] + [model.config.image_token_id] * n + [5, 6, 7]])
        with torch.no_grad():
            logits.append(model(input_ids=ids, pixel_values=pixels).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-3), (logits[0] - logits[1]).abs().max()
    evaluated = bench(["eval", str(root / "two"), "--eval-limit", "4"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]


def test_lora_checkpointing_and_bf16_compose_with_sharding(runs):
    """LoRA (added before the layers are sharded), gradient checkpointing and FSDP2's bf16 policy in one sharded run:
    it trains the adapters only, and the run directory holds them in peft's format like an unsharded LoRA run's."""
    root, _, _ = runs
    run = root / "lora"
    lora = ["--lora", "r=8,alpha=16", "--gradient-checkpointing", "--precision", "bf16"]
    flags = ["--shard", "full", *lora, "--out", str(run)]
    proc = bench(["run", "--config", str(root / "run.yaml"), *flags], launcher=TWO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded (FSDP2) over 2 processes" in proc.stdout
    stage2 = results(run)["training"][1]
    full = results(root / "two")["training"][1]
    assert stage2["lora"]["r"] == 8 and 0 < stage2["trainable_parameters"] < full["trainable_parameters"]
    assert all(h["loss"] == h["loss"] for h in results(run)["loss_history"][1])  # finite, not NaN
    assert (run / "adapter" / "adapter_config.json").exists()
