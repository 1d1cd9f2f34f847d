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


def test_blind_answers_are_kept_and_served_only_to_the_same_llm_questions_and_autocast(tmp_path, monkeypatch):
    """The blind baseline's answers are kept under a key of everything they are computed from: asked again with the
    same LLM weights, questions and autocast they are read back (not computed), equal to computing them; keys that
    would collide under a weaker key (the questions' count, the weights, the autocast) compute again; a damaged file
    is computed again and rewritten, never served."""
    import torch

    import bench.evaluate.accuracy as acc
    from bench.data.formats import Dataset, Sample
    from connector_zoo.model.vlm import VLM

    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": "linear"}, {"name": "tinyllama"}).eval()
    questions = [f"<image>\nWhat colour is the {shape}?" for shape in ("circle", "square", "triangle")]
    samples = [
        Sample(f"q{i}", [{"role": "user", "content": q}, {"role": "assistant", "content": "red"}], "img", {"type": "c"})
        for i, q in enumerate(questions)
    ]

    class Usable:  # every question fits (the blind answers read no image features)
        def encode(self, sample):
            return None

    computed, real = [], acc.answer
    monkeypatch.setattr(acc, "answer", lambda *a, **k: computed.append(len(a[1])) or real(*a, **k))
    ask = lambda data: acc.blind_answers(vlm, data, Usable(), None, tmp_path)  # noqa: E731
    first = ask(Dataset("test", samples, None))
    assert ask(Dataset("test", samples, None)) == first and computed == [3]
    assert first == real(vlm, samples, Usable(), blind=True)
    digest = acc.weights_digest(vlm.llm)  # a run computes it once for its splits: the same key
    assert acc.blind_key(vlm, samples, weights=digest) == acc.blind_key(vlm, samples)
    assert ask(Dataset("test", samples[:2], None)) == first[:2] and computed == [3, 2]  # other questions
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ask(Dataset("test", samples, None))
    assert computed == [3, 2, 3]  # another autocast
    with torch.no_grad():
        vlm.llm.model.get_input_embeddings().weight[0, 0] += 1.0
    ask(Dataset("test", samples, None))
    assert computed == [3, 2, 3, 3]  # other weights
    kept = sorted(tmp_path.glob("*.json"), key=lambda f: f.stat().st_mtime)[-1]
    record = json.loads(kept.read_text())
    kept.write_text(json.dumps({**record, "answers": ["blue"] * 3}))  # damaged: valid JSON, wrong answers
    assert ask(Dataset("test", samples, None)) == record["answers"] and computed == [3, 2, 3, 3, 3]
    assert json.loads(kept.read_text()) == record  # rewritten whole
    assert len(list(tmp_path.glob("*.json"))) == 4
