"""The length-mix generator: LLaVA-1.5 665K's sources in their shares, each with its turns and lengths; loadable by the
LLaVA reader with nothing skipped; deterministic."""

from __future__ import annotations

import json

import pytest

from bench.data.formats import llava_json
from bench.data.length_mix import SOURCES, TOTAL, shape, write_length_mix


def test_the_mix_has_the_papers_shares_and_each_sources_turns(tmp_path):
    path = write_length_mix(tmp_path / "mix", 600, seed=1)
    records = json.loads(path.read_text())
    s = shape(records)
    assert s["records"] == 600
    text_only = 40_000 / TOTAL  # ShareGPT's share, the only text-only source: 6.0 %
    assert abs(s["text_only_share"] - text_only) < 4 * (text_only * (1 - text_only) / 600) ** 0.5
    assert s["words_max"] > 20 * s["words_min"]  # one-word VQA answers beside long ShareGPT conversations
    by_name = {src.name: src for src in SOURCES}
    seen = set()
    for r in records:
        src = by_name[r["source"]]
        seen.add(src.name)
        turns = len(r["conversations"]) // 2
        assert src.turns[0] <= turns <= src.turns[1] and ("image" in r) == src.image
        assert r["conversations"][0]["value"].startswith("<image>\n") == src.image
    assert len(seen) >= 10  # (OKVQA's 1.4 % may be missing from 600 draws)
    loaded = llava_json(path, tmp_path / "mix" / "images")
    assert len(loaded.samples) == 600 and not loaded.skipped


def test_the_same_seed_writes_the_same_records(tmp_path):
    a = write_length_mix(tmp_path / "a", 50, seed=3).read_text()
    b = write_length_mix(tmp_path / "b", 50, seed=3).read_text()
    c = write_length_mix(tmp_path / "c", 50, seed=4).read_text()
    assert a == b and a != c


def test_padding_shares_of_each_layout_by_hand():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "padding_share.py"
    spec = importlib.util.spec_from_file_location("padding_share", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    batches = [[5, 3, 3], [4, 4]]  # 19 tokens
    assert module.share(batches, False) == pytest.approx(1 - 19 / (3 * 5 + 2 * 4))
    assert module.share(batches, True) == pytest.approx(1 - 19 / (3 * 5 + 2 * 4))  # 5 | 3 | 3 and 4 | 4: no gain
    assert module.share([[5, 3, 2]], True) == 0.0  # 5 | 3 2
    assert module.share(batches, True, "all") == 0.0
