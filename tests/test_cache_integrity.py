"""The world's cached backbones carry a manifest (issue 34, class 4): every file's SHA-256 is written when a backbone
is built and checked each time it is loaded, so a damaged cache file is refused with one line, never used."""

from __future__ import annotations

import json

import pytest

from bench.data.world import World, WorldConfig
from bench.train.pretrain import pretrain_encoder
from bench.train.world_llm import pretrain_llm


@pytest.mark.parametrize("backbone", ["llm", "encoder"])
def test_a_damaged_cached_backbone_is_refused(backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path / "cache"))
    world = World(WorldConfig().scaled(0.01), progress=False)
    build = {
        "llm": lambda: pretrain_llm("tinyllama", world, steps=2, log=lambda *a: None),
        "encoder": lambda: pretrain_encoder("clip", world, steps=2, log=lambda *a: None),
    }[backbone]
    out = build()
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert "model.safetensors" in files and all((out / name).is_file() for name in files)
    assert build() == out  # intact: served as it is
    weights = out / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8] ^= 0xFF  # one byte of the last tensor's data
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"model.safetensors is missing or damaged.*delete {out}"):
        build()


def test_a_backbone_built_before_manifests_gets_one_and_is_checked_from_then_on(tmp_path, monkeypatch):
    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path / "cache"))
    world = World(WorldConfig().scaled(0.01), progress=False)
    out = pretrain_llm("tinyllama", world, steps=2, log=lambda *a: None)
    (out / "manifest.json").unlink()  # as an older version left it
    assert pretrain_llm("tinyllama", world, steps=2, log=lambda *a: None) == out
    assert "config.json" in json.loads((out / "manifest.json").read_text())["files"]
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json is missing or damaged"):
        pretrain_llm("tinyllama", world, steps=2, log=lambda *a: None)
