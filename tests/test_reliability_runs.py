"""The reliability suite, whole runs: kill -9 during the backbones' pretraining and during a checkpoint write, resume
on an empty cache, two runs started together on an empty cache, a LLaVA file full of bad records, ``--steps 0``.
Each must finish with the numbers of an uninterrupted run (or the recorded skips), nothing half-written left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BAD_RECORDS, GOOD, MICRO, ROOT, bench, computed, huge_png
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted micro run on a fresh cache of its own."""
    root = tmp_path_factory.mktemp("reference")
    proc = bench(
        [*MICRO, "--out", str(root / "run"), "--save-every", "2"], env={"CONNECTOR_ZOO_CACHE": str(root / "c")}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert computed(rb["loss_history"]) == computed(ra["loss_history"])
    for split in ("test", "compositional"):
        assert rb["metrics"][split]["accuracy"] == ra["metrics"][split]["accuracy"]
        assert rb["metrics"][split]["caption_loss"] == ra["metrics"][split]["caption_loss"]
    wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def backbone_digests(cache: Path) -> dict[str, str]:
    """SHA-256 of every weight file of the world's pretrained backbones, by path inside the cache."""
    files = sorted(cache.glob("world/*/backbones/*/*.safetensors"))
    assert files, f"no pretrained backbones under {cache}"
    return {str(f.relative_to(cache)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_killed_during_pretraining_resumes_to_the_same_numbers(reference, tmp_path, point="pretrain-encoder-clip:1"):
    cache, run = tmp_path / "c", tmp_path / "run"
    env = {"CONNECTOR_ZOO_CACHE": str(cache)}
    proc = bench([*MICRO, "--out", str(run), "--save-every", "2"], env={**env, "CONNECTOR_ZOO_KILL_AT": point})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (run / "config.json").exists() and not (run / "results.json").exists()
    assert leftovers(cache)  # the killed pretraining's temporary directory
    proc = bench(["run", "--resume", str(run)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_run(reference / "run", run)
    assert backbone_digests(cache) == backbone_digests(reference / "c")  # byte-identical backbones
    assert not leftovers(cache) and not leftovers(run)


def test_killed_during_a_checkpoint_write_resumes_on_an_empty_cache(reference, tmp_path):
    run = tmp_path / "run"
    proc = bench(
        [*MICRO, "--out", str(run), "--save-every", "2"],
        env={"CONNECTOR_ZOO_CACHE": str(tmp_path / "c1"), "CONNECTOR_ZOO_KILL_AT": "checkpoint-write:1:4"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((run / "stage1" / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 2  # the step-4 checkpoint was written but never renamed into place
    assert leftovers(run / "stage1")
    empty = tmp_path / "c2"  # another machine, or a cleaned cache: the world and backbones are rebuilt
    proc = bench(["run", "--resume", str(run)], env={"CONNECTOR_ZOO_CACHE": str(empty)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 2/6" in proc.stdout
    same_run(reference / "run", run)
    assert backbone_digests(empty) == backbone_digests(reference / "c")
    assert not leftovers(run)


def test_two_runs_started_together_on_an_empty_cache_both_finish(reference, tmp_path):
    env_cache = {"CONNECTOR_ZOO_CACHE": str(tmp_path / "c")}
    procs = []
    for name in ("a", "b"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **env_cache}
        cmd = [sys.executable, "-m", "bench.cli", *MICRO, "--out", str(tmp_path / name), "--save-every", "2"]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    for name in ("a", "b"):
        same_run(reference / "run", tmp_path / name)
    assert backbone_digests(tmp_path / "c") == backbone_digests(reference / "c")
    assert not leftovers(tmp_path / "c")


def test_a_llava_file_full_of_bad_records_trains_and_reports_each(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (48, 40), (20 * i, 100, 200 - 10 * i)).save(folder / f"{i}.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "0.jpg").read_bytes()[:200])
    huge_png(folder / "huge.png", 12000, 12000)
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    records = [{"id": f"good{i}", "image": f"{i}.jpg", "conversations": GOOD} for i in range(12)]
    records += [{"id": k, **v} for k, (v, _) in BAD_RECORDS.items()]
    records += [
        {"id": name, "image": image, "conversations": GOOD}
        for name, image in (
            ("escape", "../secret.png"),
            ("absolute", str(tmp_path / "secret.png")),
            ("link_out", "link.png"),
            ("truncated", "truncated.jpg"),
            ("huge", "huge.png"),
            ("missing", "nope.jpg"),
        )
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    proc = bench(
        [
            "run",
            "--data",
            "llava",
            "--data-path",
            str(tmp_path / "data.json"),
            "--image-folder",
            str(folder),
            "--encoder-checkpoint",
            "tiny",
            "--llm-checkpoint",
            "tiny",
            "--connector",
            "mlp2x_gelu",
            "--recipe",
            "budget",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--held-out",
            "0.3",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    skipped = {s["id"]: s["reason"] for s in results["skipped_samples"]}
    assert set(BAD_RECORDS) <= set(skipped)  # at load, with their reasons
    for rid, (_, says) in BAD_RECORDS.items():
        assert says in skipped[rid]
    # the image problems surface where the image is first needed: in a training batch (4 steps of 4 cover the
    # 13 training samples) or in the held-out check before training
    for rid, says in (
        ("escape", "outside the image folder"),
        ("absolute", "outside the image folder"),
        ("link_out", "outside the image folder"),
        ("truncated", "cannot be read"),
        ("huge", "over the limit"),
        ("missing", "cannot be read"),
    ):
        assert says in skipped[rid], (rid, skipped.get(rid))
    assert results["training"][0]["steps"] == 4


def test_a_temporary_directory_too_long_for_worker_sockets_trains_the_same_run(reference, tmp_path):
    """A data-loader worker passes its tensors through an AF_UNIX socket under $TMPDIR (at most 107 bytes of path):
    with a longer TMPDIR the first batch used to hang forever (the send failed in the worker's feeder thread)."""
    from bench.data.loader import worker_sockets_fit

    tmp = tmp_path / ("t" * max(1, 120 - len(str(tmp_path))))
    tmp.mkdir()
    assert not worker_sockets_fit(str(tmp)) and worker_sockets_fit("/tmp")
    env = {"CONNECTOR_ZOO_CACHE": str(reference / "c"), "TMPDIR": str(tmp)}
    proc = bench(
        [*MICRO, "--num-workers", "1", "--out", str(tmp_path / "run"), "--save-every", "2"], env=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_run(reference / "run", tmp_path / "run")


def test_steps_zero_trains_nothing_and_eval_limit_zero_evaluates_nothing(tmp_path):
    out = tmp_path / "run"
    args = [*MICRO, "--out", str(out)]
    args[args.index("--steps") + 1] = "0"
    args[args.index("--eval-limit") + 1] = "0"
    proc = bench(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [s["steps"] for s in results["config"]["stages"]] == [0, 0]
    assert [t["steps"] for t in results["training"]] == [0, 0] and results["loss_history"] == [[], []]
    assert results["metrics"] == {"test": {}, "compositional": {}}
    assert "not evaluated (eval_limit 0)" in proc.stdout
