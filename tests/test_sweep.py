"""`bench sweep` resumes a killed sweep without redoing finished cells; `bench report` is deterministic."""

from __future__ import annotations

import json

import pytest
from conftest import bench

MICRO_SWEEP = ["sweep", "--connector", "linear,cls_prune[keep_ratio=0.5]", "--world-scale", "0.01",
               "--pretrain-steps", "3", "--steps", "4", "--eval-limit", "6"]  # fmt: skip


def test_killed_sweep_resumes_and_report_is_deterministic(tmp_path):
    out = tmp_path / "sweep"
    # killed at step 3 of the first cell's first stage, then the sweep is run again
    killed = bench([*MICRO_SWEEP, "--out", str(out)], env={"CONNECTOR_ZOO_KILL_AT": "step:1:3"})
    assert killed.returncode != 0
    cells = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(cells) == 1 and not (cells[0] / "results.json").exists()
    again = bench([*MICRO_SWEEP, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and again.stdout.count("running") == 1
    cells = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(cells) == 2 and all((c / "results.json").exists() for c in cells)
    finished = {c: (c / "results.json").stat().st_mtime_ns for c in cells}
    third = bench([*MICRO_SWEEP, "--out", str(out)])
    assert third.returncode == 0 and third.stdout.count("finished, skipped") == 2
    assert finished == {c: (c / "results.json").stat().st_mtime_ns for c in cells}
    # the table: one row per configuration, the blind baseline as a row, rebuilt byte for byte
    table = (out / "table.md").read_text()
    assert "clip + linear + tinyllama (mini)" in table and "cls_prune[keep_ratio=0.5]" in table
    assert "blind baseline: tinyllama without the image" in table and "**" in table
    report = bench(["report", str(out), "--out", str(tmp_path / "r1")])
    assert report.returncode == 0, report.stderr[-2000:]
    bench(["report", str(out), "--out", str(tmp_path / "r2")])
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes()
    assert (tmp_path / "r1" / "table.md").read_text() == table
    assert (tmp_path / "r1" / "accuracy_vs_tokens.png").stat().st_size > 1000
    tokens = {json.loads((c / "results.json").read_text())["visual_tokens_per_image"]["mean"] for c in cells}
    assert tokens == {64.0, 32.0}


def test_peer_benchmark_trains_both_to_the_same_losses_step_by_step():
    """Same weights, samples, order and schedule: transformers' Trainer on Llava and ours give equal losses."""
    import dataclasses

    from bench.peer import peer_benchmark
    from bench.run import RunConfig
    from bench.world import WorldConfig

    world = {"kind": "world", "world": dataclasses.asdict(WorldConfig().scaled(0.01)),
             "pretrain": {"encoder_steps": 3, "llm_steps": 3}}  # fmt: skip
    r = peer_benchmark(RunConfig(connector={"name": "mlp2x_gelu"}, data=world), steps=4, batch_size=2, log=print)
    assert len(r["ours_losses"]) == len(r["peer_losses"]) == 4
    for ours, peer in zip(r["ours_losses"], r["peer_losses"]):
        assert abs(ours - peer) <= 1e-4 * abs(ours), (r["ours_losses"], r["peer_losses"])
    assert r["ours_losses"][0] != r["ours_losses"][-1]  # training moved
    assert r["ours_samples_per_second"] > 0 and r["peer_peak_rss_bytes"] > 0 and r["matmul_gflops_per_second"] > 0
    assert r["peer_gflops_per_second"] > 0 and r["train_flops_per_sample"] > 0


@pytest.mark.slow
def test_peer_command_prints_both_lines():
    proc = bench(["peer", "--steps", "2", "--batch-size", "2", "--world-scale", "0.01", "--pretrain-steps", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "connector-zoo (feature cache)" in proc.stdout and "transformers Trainer + Llava" in proc.stdout
    assert "ratio:" in proc.stdout and "GFLOP/s" in proc.stdout
