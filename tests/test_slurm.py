"""``bench sweep --launcher slurm`` on a real one-node Slurm (tests/slurm_cluster.py): a 4-cell micro sweep, at most 2
cells at once, gives the results of the same sweep run locally, and a cell requeued in the middle of its run
(``scontrol requeue``: what preemption does) resumes from its last checkpoint to the same results."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import bench, computed
from slurm_cluster import start, stop

pytestmark = pytest.mark.slow

SWEEP = [
    "sweep",
    "--connector",
    "linear,mlp2x_gelu",
    "--seeds",
    "0,1",
    "--world-scale",
    "0.01",
    "--pretrain-steps",
    "3",
    "--steps",
    "12",
    "--eval-limit",
    "4",
    "--precision",
    "fp32",
]
REQUEUED = "clip--linear--tinyllama--s0"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    env = start(root, cpus=4)  # room for 4 one-CPU cells: the sweep's own limit (2) is what binds
    yield env
    stop(root)


def squeue(env, fmt: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", fmt], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def results(run) -> dict:
    return json.loads((run / "results.json").read_text())


def test_a_slurm_sweep_equals_the_local_one_with_a_requeued_cell(slurm, tmp_path):
    import os

    env = {**os.environ, **slurm}
    local = bench([*SWEEP, "--out", str(tmp_path / "local")])
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "slurm"
    args = [*SWEEP, "--out", str(out), "--launcher", "slurm", "--slurm-cpus", "1", "--slurm-parallel", "2"]
    submitted = bench(args, env=slurm)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    jobs = json.loads((out / ".slurm" / "jobs.json").read_text())
    assert len(jobs) == 4 and all("submitted as Slurm job" in submitted.stdout for _ in jobs)
    # requeue the first cell once its stage 1 is checkpointed and before it has finished; count who runs at once
    most, requeued = 0, False
    deadline = time.time() + 600
    while time.time() < deadline:
        most = max(most, squeue(env, "%T").count("RUNNING"))
        cell = out / REQUEUED
        if not requeued and (cell / "stage1" / "checkpoint-last").exists() and not (cell / "results.json").exists():
            job = jobs[REQUEUED]["job_id"]
            subprocess.run(["scontrol", "requeue", job], env=env, check=True)
            # Slurm holds a requeued job back two minutes (its BeginTime): once it is pending again, start it now
            for _ in range(120):
                state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
                if state.stdout.strip() == "PENDING":
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=False)
                    break
                time.sleep(0.25)
            requeued = True
        # every record written and no job left: a cell requeued just after its results.json (while it writes hf/)
        # runs once more, resuming, and the test must not read its run.log before then
        if all((out / name / "results.json").exists() for name in jobs) and not squeue(env, "%i"):
            break
        time.sleep(0.5)
    assert requeued, "the cell finished before it could be requeued"
    status = bench(["sweep", "--status", str(out)], env=slurm)
    assert status.returncode == 0, status.stderr[-3000:]
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert {name: lines[name][1:3] for name in jobs} == {name: ["done", jobs[name]["job_id"]] for name in jobs}
    assert 1 <= most <= 2
    assert "resumed at step" in (out / REQUEUED / "run.log").read_text()
    for name in jobs:
        a, b = results(tmp_path / "local" / name), results(out / name)
        assert computed(a["loss_history"]) == computed(b["loss_history"]), name
        assert a["metrics"]["test"]["accuracy"] == b["metrics"]["test"]["accuracy"], name
    # submitting the same sweep again runs nothing: every cell is finished
    again = bench(args, env=slurm)
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 4, again.stdout[-2000:]


def test_a_failed_cell_says_its_error_in_one_status_line(slurm, tmp_path):
    out = tmp_path / "bad"
    args = [*SWEEP[:2], "cls_prune[keep_ratio=7]", *SWEEP[3:4], "0", *SWEEP[5:]]
    proc = bench([*args, "--out", str(out), "--launcher", "slurm", "--wait"], env=slurm)
    assert proc.returncode != 0 and "did not finish" in proc.stderr
    status = bench(["sweep", "--status", str(out)], env=slurm)
    (line,) = [x for x in status.stdout.splitlines() if x.startswith("clip--cls_prune")]
    assert " failed " in line and "keep_ratio=7 is out of range" in line
