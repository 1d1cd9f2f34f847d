"""The feature cache serves each image its own features: keyed by image identity and by every byte of the encoder's
weights, filled lazily, safe against a killed writer; cached, online and warm give the same numbers."""

from __future__ import annotations

import copy
import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.features import FeatureCache, bytes_per_image, decide, image_key
from bench.data.formats import Dataset, Sample, hf_messages, llava_json
from bench.data.loader import Collator
from bench.data.store import FeatureStore
from bench.train.settings import StageConfig
from bench.train.trainer import Trainer
from connector_zoo.model.vlm import VLM
from connectors import build_connector
from encoders import build_encoder


def picture(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def llava_file(path, images: list[str]) -> None:
    records = [
        {
            "id": f"{path.stem}-{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": f"picture {name}"},
            ],
        }
        for i, name in enumerate(images)
    ]
    path.write_text(json.dumps(records))


def fresh(encoder, image: Image.Image) -> torch.Tensor:
    return encoder.encode_images([image]).patches[0]


def assert_own_features(encoder, ds, batch) -> None:
    """Every sample's features are a fresh forward of its own image (and differ from every other image's)."""
    got = batch.inputs.features.patches
    for row, k in enumerate(batch.kept):
        torch.testing.assert_close(got[row], fresh(encoder, ds.images.load(ds.samples[k].image)), rtol=0, atol=1e-6)


def test_two_json_files_over_one_folder_share_rows_and_get_their_own_features(tmp_path, encoders, llms):
    enc = encoders["clip"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        picture(i).save(folder / f"{i}.png")
    llava_file(tmp_path / "a.json", ["0.png", "1.png", "2.png", "3.png"])
    llava_file(tmp_path / "b.json", ["3.png", "1.png", "4.png", "5.png", "0.png"])  # reordered, longer
    root = tmp_path / "features"
    runs = {}
    for name in ("a", "b"):
        ds = llava_json(tmp_path / f"{name}.json", folder)
        cache = FeatureCache(enc, ds.images, with_attention=False, root=root)
        batch = Collator(llms["qwen3"], cache, visual_budget=64, max_length=None).batch(ds.samples)
        assert_own_features(enc, ds, batch)
        runs[name] = cache.forwards
    assert runs == {"a": 4, "b": 2}  # b encodes only the two images a did not have
    # the images really differ, so a row served under a position key would have failed the comparison above
    assert (fresh(enc, picture(0)) - fresh(enc, picture(3))).abs().max() > 1e-2

    # an image changed on disk is encoded again, and its new features are served
    os.utime(folder / "1.png", ns=(1, 1))
    picture(99).save(folder / "1.png")
    ds = llava_json(tmp_path / "b.json", folder)
    cache = FeatureCache(enc, ds.images, with_attention=False, root=root)
    batch = Collator(llms["qwen3"], cache, visual_budget=64, max_length=None).batch(ds.samples)
    assert cache.forwards == 1
    assert_own_features(enc, ds, batch)


def test_hf_datasets_key_images_by_their_bytes(tmp_path, encoders, llms):
    def save(name: str, seeds: list[int]):
        rows = {
            "messages": [
                [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"p{s}"}]},
                ]
                for s in seeds
            ],
            "images": [[picture(s)] for s in seeds],
        }
        data = datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))
        data.save_to_disk(str(tmp_path / name))
        return hf_messages(tmp_path / name)

    enc, root = encoders["clip"], tmp_path / "features"
    first, second = save("one", [1, 2, 3]), save("two", [3, 9, 1])  # rows 0 and 2 of each: different images
    forwards = []
    for ds in (first, second):
        cache = FeatureCache(enc, ds.images, with_attention=False, root=root)
        batch = Collator(llms["qwen3"], cache, visual_budget=64, max_length=None).batch(ds.samples)
        assert_own_features(enc, ds, batch)
        forwards.append(cache.forwards)
    assert forwards == [3, 1]


def test_the_encoder_key_covers_every_weight_byte(encoders):
    enc = encoders["clip"]
    twin = copy.deepcopy(enc)
    assert twin.cache_key() == enc.cache_key()
    name, tensor = max(twin.state_dict().items(), key=lambda kv: kv[1].numel())
    assert tensor.numel() * tensor.element_size() > 4096
    with torch.no_grad():
        tensor.view(-1)[-1] += 1.0  # past the first 4,096 bytes the old key read
    assert twin.cache_key() != enc.cache_key()
    assert twin.cache_key() == twin.cache_key()  # remembered, and recomputed only after a change


def test_a_killed_writer_never_leaves_a_row_that_looks_valid(tmp_path):
    layout = {"patches": (2, 3)}
    store = FeatureStore(tmp_path, layout, "float32")
    rows = torch.arange(12, dtype=torch.float32).view(2, 2, 3)
    store.write([image_key("a"), image_key("b")], {"patches": rows})
    index = next(tmp_path.glob("*.idx"))
    # a writer killed after its data, before (or half-way through) its index line
    store._map(store.writer, 0, "patches", mode="w+")[2] = 7.0
    with open(index, "a") as f:
        f.write(f"{image_key('c')} 0 ")
    reader = FeatureStore(tmp_path, layout, "float32")
    assert set(reader.index) == {image_key("a"), image_key("b")}
    assert torch.equal(reader.tensor([reader.read([image_key("b")])[image_key("b")]["patches"]])[0], rows[1])
    with open(index, "a") as f:  # the line completed: now the row is served
        f.write("2\n")
    assert image_key("c") in reader.read([image_key("c")])
    with pytest.raises(ValueError, match="another layout"):
        FeatureStore(tmp_path, {"patches": (4, 3)}, "float32")


def test_bf16_rows_take_half_the_bytes_and_equal_the_online_features(tmp_path, llms):
    enc16 = build_encoder("clip", dtype="bfloat16")
    enc32 = build_encoder("clip")
    assert 2 * bytes_per_image(enc16, True) == bytes_per_image(enc32, True)
    images = [picture(i) for i in range(3)]
    ds = Dataset(
        "t",
        [
            Sample(str(i), [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}], i)
            for i in range(3)
        ],
        _table(images),
    )
    out = {}
    for cached in (True, False, True):
        cache = FeatureCache(enc16, ds.images, with_attention=True, root=tmp_path, cached=cached)
        batch = Collator(llms["qwen3"], cache, 64, None).batch(ds.samples)
        out.setdefault(cached, []).append((batch.inputs.features, cache.forwards))
    (cold, n_cold), (warm, n_warm), (online, n_online) = out[True][0], out[True][1], out[False][0]
    assert cold.patches.dtype == torch.bfloat16 and (n_cold, n_warm, n_online) == (3, 0, 3)
    for a in (warm, online):
        assert torch.equal(a.patches, cold.patches) and torch.equal(a.cls_attention, cold.cls_attention)
    # sparse shards (room for 4,096 rows each): the rows written, plus a few blocks per file for header and end
    assert cache.store.disk_bytes() <= 3 * bytes_per_image(enc16, True) + 3 * 3 * 4096


def _table(images):
    from bench.data.images import ArrayImages

    return ArrayImages("test", np.stack([np.asarray(im) for im in images]), [str(i) for i in range(len(images))])


def test_auto_caches_what_fits_and_says_why(encoders):
    enc = encoders["clip"]
    table = _table([picture(i) for i in range(10)])
    need = 10 * bytes_per_image(enc, False)
    on, why = decide("auto", enc, [table], False, max_gb=need / 1e9)
    assert on and "fits" in why and "10 images" in why
    on, why = decide("auto", enc, [table], False, max_gb=need / 1e9 / 2)
    assert not on and "exceeds" in why
    assert decide("off", enc, [table], False, None) == (False, "--feature-cache off")
    with pytest.raises(ValueError, match="auto, on, off"):
        decide("sometimes", enc, [table], False, None)


def loss_history(tmp_path, vlm, ds, num_workers, cached, name, resume_from=None, stop_at=None):
    cache = FeatureCache(vlm.encoder, ds.images, with_attention=False, root=tmp_path / "features", cached=cached)
    collator = Collator(vlm.llm, cache, vlm.connector.max_tokens(vlm.encoder.info), None)
    cfg = StageConfig(stage=1, steps=6, batch_size=3, grad_accum=2, lr=1e-2, save_every=2)
    torch.manual_seed(0)
    vlm.connector.load_state_dict(INIT)
    trainer = Trainer(vlm, ds, collator, cfg, tmp_path / name, seed=0, log=lambda m: None, num_workers=num_workers)
    if resume_from is not None:
        trainer.resume(resume_from)
    if stop_at is not None:  # a run killed after this step (its schedule is still the 6-step one)
        trainer.total_steps = stop_at
    trainer.fit()
    return [h["loss"] for h in trainer.history], cache.forwards, trainer


INIT: dict = {}


def test_workers_cache_on_off_and_resume_give_identical_losses(tmp_path, encoders, llms):
    """fp32: the same losses with 0 or 2 workers, cache cold, warm or off, and resumed mid-epoch from a checkpoint;
    a bad image is skipped and recorded once, not raised in a worker."""
    enc, llm = encoders["clip"], llms["tinyllama"]
    images = [picture(i) for i in range(8)]
    question = {"role": "user", "content": "<image>\nWhat is it?"}
    samples = [
        Sample(f"s{i}", [question, {"role": "assistant", "content": f"picture {i % 8}"}], i % 8) for i in range(20)
    ]
    folder = tmp_path / "img"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i}.png")
    (folder / "7.png").write_bytes(b"broken")  # samples s7, s15 have an unreadable image
    from bench.data.images import FileImages

    ds = Dataset("t", samples, FileImages(folder, [f"{i}.png" for i in range(8)]))
    torch.manual_seed(0)
    vlm = VLM(enc, build_connector("mlp2x_gelu", enc.info.hidden_size, llm.hidden_size), llm)
    INIT.update({k: v.clone() for k, v in vlm.connector.state_dict().items()})
    base, n0, trainer = loss_history(tmp_path, vlm, ds, 0, cached=False, name="off0")
    assert n0 > 7 and {s["id"] for s in ds.skipped} == {"s7", "s15"} and len(ds.skipped) == 2
    for workers, cached, name in ((2, True, "cold2"), (2, True, "warm2"), (1, False, "off1")):
        losses, forwards, _ = loss_history(tmp_path, vlm, ds, workers, cached, name)
        assert losses == base, name
        if name == "warm2":
            assert forwards == 0
    # killed after step 4 of 6 (mid-epoch: 20 samples, 12 a step), resumed from its last checkpoint
    partial, _, _ = loss_history(tmp_path, vlm, ds, 2, True, "killed", stop_at=4)
    resumed, _, _ = loss_history(tmp_path, vlm, ds, 2, True, "resumed", tmp_path / "killed" / "checkpoint-last")
    assert partial == base[:4] and resumed == base


def test_the_first_complete_builder_wins_and_later_ones_discard_their_copy(tmp_path):
    """Two runs building one cached directory at once: the one that finishes second must not replace the directory
    the first one (and its readers) already use."""
    from connector_zoo.io import materialize

    target = tmp_path / "presets" / "clip-tiny"

    def slow_builder(tmp):
        (tmp / "weights").write_text("second")
        materialize(target, lambda t: (t / "weights").write_text("first"))  # another process finishes meanwhile
        reader = open(target / "weights")  # noqa: SIM115 (held open across the second rename)
        slow_builder.reader = reader

    materialize(target, slow_builder)
    assert (target / "weights").read_text() == "first" and slow_builder.reader.read() == "first"
    slow_builder.reader.close()
    assert [p.name for p in target.parent.iterdir()] == ["clip-tiny"]  # no temporary left behind
    (target / ".complete").unlink()  # an incomplete leftover is replaced
    materialize(target, lambda t: (t / "weights").write_text("rebuilt"))
    assert (target / "weights").read_text() == "rebuilt"
