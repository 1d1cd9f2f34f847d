"""Nothing reported that was not measured (issue 34, class 1): a loss over zero usable samples is "not evaluated",
never 0.0 with perplexity 1.0, and a stage that trained on no usable sample stops with one line naming why."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from conftest import GOOD
from PIL import Image

from bench.cli import main
from bench.data.formats import Dataset, Sample, llava_json
from bench.train.trainer import validation_loss

RUN = [
    "--encoder-checkpoint",
    "tiny",
    "--llm-checkpoint",
    "tiny",
    "--connector",
    "mlp2x_gelu",
    "--recipe",
    "budget",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--grad-accum",
    "1",
]
BROKEN_PNG = b"\x89PNG\r\n\x1a\n truncated"


def corpus(root, n: int = 6):
    (root / "images").mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / "images" / f"{i}.png")
    records = [{"id": f"r{i}", "image": f"{i}.png", "conversations": GOOD} for i in range(n)]
    (root / "d.json").write_text(json.dumps(records))
    return ["--data", "llava", "--data-path", str(root / "d.json"), "--image-folder", str(root / "images")]


def test_a_loss_over_no_usable_sample_is_none():
    class Batch:
        inputs, skipped = None, [("a", "image a.png cannot be read")]

    images = SimpleNamespace(key="t")
    collator = SimpleNamespace(features=SimpleNamespace(images=images), batch=lambda samples: Batch())
    data = Dataset("d", [Sample("a", GOOD, 0, {})], images, [])
    model = SimpleNamespace(eval=lambda: None)
    assert validation_loss(model, data, collator, batch_size=4) is None
    assert data.skipped == [{"id": "a", "reason": "image a.png cannot be read"}]


def test_an_unreadable_only_held_out_sample_is_not_evaluated_not_a_perfect_score(tmp_path, capsys):
    args = corpus(tmp_path)
    full = llava_json(tmp_path / "d.json", tmp_path / "images")
    _, held = full.split(0.05, seed=0)
    (tmp_path / "images" / f"{held.samples[0].id[1:]}.png").write_bytes(BROKEN_PNG)  # the one held-out image
    assert main(["run", *args, *RUN, "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["heldout"]
    assert metrics["loss"] is None and metrics["perplexity"] is None and "accuracy" not in metrics
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "heldout        loss not evaluated (no usable sample)" in summary


def test_a_stage_that_trained_on_no_usable_sample_stops_with_one_line(tmp_path, capsys):
    args = corpus(tmp_path)
    full = llava_json(tmp_path / "d.json", tmp_path / "images")
    train, _ = full.split(0.05, seed=0)
    for s in train.samples:  # every training image unreadable; the held-out one is fine
        (tmp_path / "images" / f"{s.id[1:]}.png").write_bytes(BROKEN_PNG)
    assert main(["run", *args, *RUN, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(
        r"bench run: error: stage 2 trained on no usable sample; (\d) samples skipped so far, most often: "
        r"\1 x image '...' cannot be read",
        err[-1],
    ), err[-1]
    assert not (tmp_path / "run" / "results.json").exists()
