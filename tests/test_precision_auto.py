"""``--precision auto`` on a CPU: a training step of the run's own model timed in fp32 and under bf16 autocast, the
faster kept (by a margin), cached per machine and model, recorded with the reason, and used again by every command
that reads the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONV_A, CONV_B, MICRO, batch, bench, images

import bench.train.precision as precision
from connector_zoo.model.precision import run_precision
from connector_zoo.model.vlm import VLM


def tiny(connector: str = "mlp2x_gelu") -> tuple[VLM, object]:
    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": connector}, {"name": "tinyllama"})
    return vlm, batch(vlm.llm, [CONV_A, CONV_B], [True, True], vlm.encoder.preprocess(images(2)))


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """A fake clock for the probe: seconds per step by precision, and a count of the steps timed."""
    monkeypatch.delenv("CONNECTOR_ZOO_CPU_BF16", raising=False)
    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path / "cache"))
    seconds = {"no": 0.2, "bf16": 0.1}
    calls = []

    def fake(vlm, inputs, prec):
        calls.append(prec)
        return seconds[prec]

    monkeypatch.setattr(precision, "training_step_seconds", fake)
    return seconds, calls


def test_the_faster_precision_is_chosen_and_measured_once_per_machine_and_model(timed):
    seconds, calls = timed
    vlm, inputs = tiny()
    chosen, record = precision.cpu_precision_decision(vlm, inputs)
    assert chosen == "bf16" and record["fp32_seconds"] == 0.2 and "2.00x" in record["why"]
    measured = len(calls)
    assert measured == 2 + 2 * 3  # a warm-up of each, then three alternating rounds
    seconds["bf16"] = 0.5  # the same model again: read back, not timed (a slower bf16 now would flip it)
    assert precision.cpu_precision_decision(vlm, inputs)[0] == "bf16" and len(calls) == measured
    # another model (under a key of the machine alone it would reuse the first answer): timed, and fp32 wins
    other, other_inputs = tiny("linear")
    chosen, record = precision.cpu_precision_decision(other, other_inputs)
    assert chosen == "no" and len(calls) == 2 * measured


def test_a_small_gain_is_not_enough(timed):
    seconds, _ = timed
    seconds["bf16"] = 0.19  # 1.05x: inside the margin, fp32 kept
    vlm, inputs = tiny()
    assert precision.cpu_precision_decision(vlm, inputs)[0] == "no"


def test_the_probe_leaves_the_model_and_the_random_state_as_they_were():
    vlm, inputs = tiny()
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    rng = torch.get_rng_state()
    for prec in ("no", "bf16"):
        assert precision.training_step_seconds(vlm, inputs, prec) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in vlm.parameters())
    assert all(torch.equal(before[k], v) for k, v in vlm.state_dict().items())


def test_commands_that_read_a_run_use_the_precision_it_recorded(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"precision": "auto"}))
    assert run_precision(run) == "no"  # no record yet: the config resolved here (fp32 on a CPU)
    (run / "results.json").write_text(json.dumps({"precision": {"compute": "bf16", "backbone": "fp32"}}))
    assert run_precision(run) == "bf16"


@pytest.mark.slow
def test_an_auto_run_records_what_it_chose_and_why(tmp_path):
    out = tmp_path / "auto"
    proc = bench([*MICRO, "--out", str(out)], env={"CONNECTOR_ZOO_CPU_BF16": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["precision"] == {"compute": "bf16", "backbone": "fp32", "why": "CONNECTOR_ZOO_CPU_BF16=1"}
    assert "precision: bf16 autocast (CONNECTOR_ZOO_CPU_BF16=1)" in proc.stdout
    assert run_precision(out) == "bf16"
