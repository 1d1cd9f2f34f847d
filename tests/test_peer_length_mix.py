"""``bench peer --length-mix`` at micro size: three trainers in their own processes on the length mix, ours on hf's
batches (equal losses at every step), packed with no padding; and the summary's arithmetic by hand."""

from __future__ import annotations

import re

import pytest
from conftest import bench

from bench.evaluate.peer_mix import summary


def test_the_summary_by_hand():
    runs = {
        "ours": [{"seconds": 2.0, "positions": 100, "peak_rss_bytes": 2**30, "losses": [3.0, 2.0]}] * 2
        + [{"seconds": 4.0, "positions": 100, "peak_rss_bytes": 2**30, "losses": [3.0, 2.0]}],
        "hf": [{"seconds": 6.0, "positions": 125, "peak_rss_bytes": 2**31, "losses": [3.0, 2.002]}] * 3,
        "hf-grouped": [{"seconds": 4.0, "positions": 110, "peak_rss_bytes": 2**31, "losses": [3.1, 2.1]}] * 3,
    }
    s = summary({"runs": runs, "useful_tokens": 100, "samples": 8, "model_flops": 4e9})
    assert s["ours"]["useful_tokens_per_second"] == {"median": 50.0, "min": 25.0, "max": 50.0}
    assert s["hf"]["padding_share"]["median"] == pytest.approx(0.2)  # 25 of 125 positions
    assert s["ours"]["padding_share"]["median"] == 0.0
    assert s["speedup_vs_hf"] == {"median": 3.0, "min": 1.5, "max": 3.0}  # per round: 6/2, 6/2, 6/4
    assert s["speedup_vs_hf-grouped"]["median"] == 2.0
    assert s["rss_vs_hf"]["median"] == 0.5
    assert s["hf"]["model_gflops_per_second"]["median"] == pytest.approx(4 / 6)
    assert s["loss_gap"] == pytest.approx(0.002 / 2.002)  # against hf only: hf-grouped saw other batches


@pytest.mark.slow
def test_the_length_mix_peer_trains_ours_to_hfs_losses_with_no_padding():
    proc = bench(["peer", "--length-mix", "--connector", "mlp2x_gelu", "--steps", "2", "--batch-size", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("round ") == 9  # 3 rounds x 3 processes, interleaved
    padding = {
        label: float(re.search(rf"^  {re.escape(label)} .*?padding (\d+\.\d)%", out, re.M).group(1))
        for label in ("connector-zoo (packed, cache)", "HF Trainer + Llava", "HF Trainer + Llava, grouped")
    }
    assert padding["connector-zoo (packed, cache)"] == 0.0 and padding["HF Trainer + Llava"] > 0, out
    gap = float(re.search(r"same batches\): (\S+)", out).group(1))
    assert gap < 1e-4, out
    ours, hf = (re.search(rf"loss per step, {who}:\s+(.*)", out).group(1).split() for who in ("ours", "hf"))
    assert len(ours) == len(hf) == 2


def test_too_few_samples_is_one_line_naming_the_need(tmp_path):
    import json

    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Black."}]
    (tmp_path / "chat.json").write_text(
        json.dumps([{"id": str(i), "image": "a.png", "conversations": turns} for i in range(4)])
    )
    args = ["peer", "--length-mix", "--data", "llava", "--data-path", str(tmp_path / "chat.json")]
    proc = bench([*args, "--image-folder", str(tmp_path / "images"), "--steps", "2", "--batch-size", "4"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("needs 8 training samples; the data has 3"), proc.stderr
