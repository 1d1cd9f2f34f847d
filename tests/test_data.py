"""The published data formats load from fixtures in exactly their layouts; bad samples are skipped and reported."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import bench
from PIL import Image

from bench.data.features import FeatureCache
from bench.data.formats import BadSample, hf_messages, llava_json
from bench.data.loader import Collator


def write_llava_fixture(root):
    """LLaVA-style JSON + image folder, with every kind of bad record next to good ones."""
    (root / "images" / "00000").mkdir(parents=True)
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(root / "images" / "00000" / f"00000000{i}.jpg")
    (root / "images" / "00000" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    records = [
        {
            "id": "GCC_0",
            "image": "00000/000000000.jpg",
            "conversations": [
                {"from": "human", "value": "Give a brief description of the image.\n<image>"},
                {"from": "gpt", "value": "a red wall"},
            ],
        },
        {
            "id": "GCC_1",
            "image": "00000/000000001.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "Blue"},
                {"from": "human", "value": "Are you sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {"id": "text_only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {
            "id": "missing_image",
            "image": "00000/nope.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "corrupt_image",
            "image": "00000/corrupt.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "no_placeholder",
            "image": "00000/000000002.jpg",
            "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "green"}],
        },
        {"id": "malformed", "image": "00000/000000002.jpg", "conversation": []},
        {"id": "bad_turn", "conversations": [{"from": "robot", "value": "beep"}]},
    ]
    (root / "chat.json").write_text(json.dumps(records))
    return root / "chat.json", root / "images"


def test_llava_json_loads_and_reports_bad_records(tmp_path, encoders, llms):
    path, folder = write_llava_fixture(tmp_path)
    ds = llava_json(path, folder)
    assert [s.id for s in ds.samples] == ["GCC_0", "GCC_1", "text_only", "missing_image", "corrupt_image"]
    assert ds.samples[1].messages[2] == {"role": "user", "content": "Are you sure?"}
    assert ds.samples[2].image is None
    reasons = {s["id"]: s["reason"] for s in ds.skipped}
    assert "0 <image> tokens" in reasons["no_placeholder"] and "malformed" in reasons["malformed"]
    assert "robot" in reasons["bad_turn"]
    # unreadable images are found when their batch is loaded: the batch goes on without them, each reported once
    cache = FeatureCache(encoders["clip"], ds.images, with_attention=False, root=tmp_path / "feat")
    collator = Collator(llms["qwen3"], cache, visual_budget=64, max_length=None)
    for _ in range(2):  # a second epoch meets them again
        batch = collator.batch(ds.samples)
        for sample_id, reason in batch.skipped:
            ds.skip(sample_id, reason, strict=False)
    assert [ds.samples[k].id for k in batch.kept] == ["GCC_0", "GCC_1", "text_only"]
    assert batch.inputs.has_image == [True, True, False] and batch.inputs.features.batch_size == 2
    reasons = {s["id"]: s["reason"] for s in ds.skipped}
    assert "cannot be read" in reasons["missing_image"] and "corrupt.jpg" in reasons["corrupt_image"]
    assert [s["id"] for s in ds.skipped].count("missing_image") == 1


def test_strict_stops_at_the_first_bad_record(tmp_path):
    path, folder = write_llava_fixture(tmp_path)
    with pytest.raises(BadSample, match="'no_placeholder': has an image but 0 <image> tokens"):
        llava_json(path, folder, strict=True)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not a readable LLaVA JSON"):
        llava_json(tmp_path / "broken.json", folder)


def write_hf_fixture(root):
    """The HuggingFaceH4/llava-instruct-mix-vsft form: messages with content lists, and a list of images."""
    image_feature = datasets.Sequence(datasets.Image())
    rows = {
        "messages": [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "text": None, "index": 0},
                        {"type": "text", "text": "What colour is this?", "index": None},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Purple.", "index": None}]},
            ],
            [
                {"role": "user", "content": [{"type": "text", "text": "No image here.", "index": None}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Fine.", "index": None}]},
            ],
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "text": None, "index": 0},
                        {"type": "text", "text": "Two images?", "index": None},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "No.", "index": None}]},
            ],
        ],
        "images": [[Image.new("RGB", (20, 20), "purple")], [], [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]],
    }
    data = datasets.Dataset.from_dict(rows).cast_column("images", image_feature)
    data.save_to_disk(str(root / "vsft"))
    return root / "vsft"


def test_hf_messages_images_form(tmp_path, llms, encoders):
    ds = hf_messages(write_hf_fixture(tmp_path))
    assert len(ds.samples) == 2 and ds.skipped[0]["reason"].startswith("1 image placeholders for 2 images")
    first = ds.samples[0]
    assert first.messages == [
        {"role": "user", "content": "<image>\nWhat colour is this?"},
        {"role": "assistant", "content": "Purple."},
    ]
    assert np.asarray(ds.images.load(first.image))[0, 0].tolist() == [128, 0, 128]
    cache = FeatureCache(encoders["clip"], ds.images, with_attention=False)
    collator = Collator(llms["qwen3"], cache, visual_budget=64, max_length=None)
    batch = collator(ds.samples)
    assert batch.has_image == [True, False] and batch.features.patches.shape[0] == 1


def test_feature_cache_is_bit_identical_and_encodes_each_image_once(tmp_path, encoders):
    path, folder = write_llava_fixture(tmp_path)
    ds = llava_json(path, folder)
    enc = encoders["clip"]
    cache = FeatureCache(enc, ds.images, with_attention=True, root=tmp_path / "feat")
    first = cache.get([0, 1, 0])
    assert cache.forwards == 2  # two distinct images
    again = FeatureCache(enc, ds.images, with_attention=True, root=tmp_path / "feat")
    second = again.get([1, 0])
    assert again.forwards == 0  # a new run, another process: nothing re-encoded
    assert torch.equal(second.patches[1], first.patches[0]) and torch.equal(second.cls[0], first.cls[1])
    assert torch.equal(second.cls_attention[0], first.cls_attention[1])
    direct = enc.encode_images([ds.images.load(0)], with_cls_attention=True)
    torch.testing.assert_close(first.patches[:1], direct.patches, rtol=0, atol=1e-6)
    # keyed by what determines the features: another layer does not reuse these
    other = FeatureCache(type(enc)(enc.source, layer=-1), ds.images, with_attention=True, root=tmp_path / "feat")
    assert other.dir != cache.dir


def test_sequences_that_cannot_fit_are_reported(tmp_path, llms, encoders):
    path, folder = write_llava_fixture(tmp_path)
    ds = llava_json(path, folder)
    cache = FeatureCache(encoders["clip"], ds.images, with_attention=False)
    text_only = len(llms["vicuna"].encode_conversation(ds.samples[2].messages))
    # room for the text-only sample, not for an image's 64 visual tokens on top of a similar text
    collator = Collator(llms["vicuna"], cache, visual_budget=64, max_length=text_only + 20)
    batch = collator.batch(ds.samples)
    assert {i for i, reason in batch.skipped if "context budget" in reason} == {
        "GCC_0",
        "GCC_1",
        "missing_image",
        "corrupt_image",
    }
    assert [ds.samples[k].id for k in batch.kept] == ["text_only"] and batch.inputs.features is None
    assert cache.forwards == 0  # samples dropped for their length never reach the encoder


def test_group_by_length_sorts_each_step(tmp_path, llms, encoders):
    from bench.data.formats import Dataset, Sample
    from bench.train.settings import StageConfig
    from bench.train.trainer import Trainer
    from connector_zoo.model.vlm import VLM
    from connectors import build_connector

    enc, llm = encoders["clip"], llms["tinyllama"]
    words = ["a", "a b c d e f g h", "a b", "a b c d e f g h i j k l m n", "a b c d", "a b c d e f"] * 2
    ds = Dataset(
        "t",
        [
            Sample(f"s{i}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": w}])
            for i, w in enumerate(words)
        ],
        images=None,
    )
    collator = Collator(llm, None, visual_budget=0, max_length=None)
    vlm = VLM(enc, build_connector("linear", enc.info.hidden_size, llm.hidden_size), llm)
    lengths = []
    for grouped in (False, True):
        cfg = StageConfig(steps=2, batch_size=2, grad_accum=3, group_by_length=grouped)
        trainer = Trainer(vlm, ds, collator, cfg, tmp_path / str(grouped), seed=0, log=lambda m: None)
        step = [len(collator.encode(s)) for micro in range(3) for s in trainer.micro_batch(0, micro)]
        lengths.append(step)
    assert lengths[1] == sorted(lengths[1]) and lengths[0] != sorted(lengths[0])
    assert sorted(lengths[0]) == lengths[1]  # the same samples, only reordered within the step


def test_a_665k_style_mix_loads_without_touching_an_image(tmp_path, llms, encoders):
    """Sub-folders per source, text-only and multi-turn records: listing 20,000 records opens no file (none exists
    here); a missing image surfaces when its batch is loaded, as a skipped sample with its id and reason."""
    sources = ["coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K"]
    records = []
    for i in range(20000):
        turns = [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "a thing"},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "another"},
        ]
        if i % 7 == 0:
            records.append(
                {
                    "id": f"t{i}",
                    "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
                }
            )
        else:
            records.append({"id": f"r{i}", "image": f"{sources[i % 5]}/{i:012d}.jpg", "conversations": turns})
    (tmp_path / "mix.json").write_text(json.dumps(records))
    ds = llava_json(tmp_path / "mix.json", tmp_path / "data")  # the folder does not even exist
    assert len(ds.samples) == 20000 and not ds.skipped and len(ds.images) == 20000 - len(range(0, 20000, 7))
    cache = FeatureCache(encoders["clip"], ds.images, with_attention=False, root=tmp_path / "feat")
    batch = Collator(llms["tinyllama"], cache, visual_budget=64, max_length=None).batch(ds.samples[:3])
    assert [ds.samples[k].id for k in batch.kept] == ["t0"]  # the text-only record trains
    assert [i for i, _ in batch.skipped] == ["r1", "r2"]
    assert "gqa/images/000000000001.jpg" in batch.skipped[0][1] and "No such file" in batch.skipped[0][1]


def test_image_names_cannot_leave_their_folder_even_through_links(tmp_path):
    from bench.data.images import FileImages

    (tmp_path / "shared" / "coco").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "shared" / "coco" / "a.jpg")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")
    (tmp_path / "data" / "local").mkdir(parents=True)
    Image.new("RGB", (8, 8), "green").save(tmp_path / "data" / "local" / "b.png")
    (tmp_path / "data" / "coco").symlink_to(tmp_path / "shared" / "coco")  # LLaVA's usual layout
    (tmp_path / "data" / "peek.png").symlink_to(tmp_path / "secret.png")  # a link out, one file
    (tmp_path / "data" / "alias").symlink_to(tmp_path / "data" / "local")  # a link that stays inside
    names = [
        "coco/a.jpg",
        "../secret.png",
        str(tmp_path / "secret.png"),
        "peek.png",
        "local/../../secret.png",
        "alias/b.png",
    ]
    table = FileImages(tmp_path / "data", names)
    for i in range(5):  # every way out is refused, and so is a link whose target lies outside
        with pytest.raises(BadSample, match="outside the image folder"):
            table.load(i)
        with pytest.raises(BadSample, match="outside the image folder"):
            table.identity(i)
    # a link inside the folder to a place inside it is fine, and keyed by its target
    assert table.load(5).getpixel((0, 0)) == (0, 128, 0)
    assert table.identity(5).startswith(f"file:{tmp_path / 'data' / 'local' / 'b.png'}:")
    # with the opt-in, links to shared storage work (the file outside is then read on purpose)
    opened = FileImages(tmp_path / "data", names, allow_outside=True)
    assert opened.load(0).getpixel((0, 0)) == (254, 0, 0) and opened.load(3).getpixel((0, 0)) == (0, 0, 255)


COLOURS_E2E = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def e2e_rows(n: int = 40) -> list[tuple[str, Image.Image, str, str]]:
    names = list(COLOURS_E2E)
    return [
        (
            f"r{i:03d}",
            Image.new("RGB", (40 + i % 5, 36), COLOURS_E2E[names[i % 4]]),
            "What colour is this picture?",
            names[i % 4],
        )
        for i in range(n)
    ]


def run_e2e(tmp_path, data_args: list[str]) -> tuple[dict, str]:
    out = tmp_path / "run"
    proc = bench(
        [
            "run",
            *data_args,
            "--encoder-checkpoint",
            "tiny",
            "--llm-checkpoint",
            "tiny",
            "--connector",
            "mlp2x_gelu",
            "--recipe",
            "budget",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["llava", "hf"])
def test_published_formats_train_and_evaluate_end_to_end_with_a_5_percent_hold_out(tmp_path, fmt):
    """`bench run --data llava` (a JSON file + an image folder) and `--data hf` (a saved datasets Dataset in the
    messages + images form) with the default hold-out: 40 samples -> 38 trained, round(0.05 * 40) = 2 held out and
    evaluated (loss and exact match), nothing skipped."""
    rows = e2e_rows()
    if fmt == "llava":
        (tmp_path / "images").mkdir()
        for rid, image, _, _ in rows:
            image.save(tmp_path / "images" / f"{rid}.png")
        turns = lambda q, a: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]  # noqa: E731
        records = [{"id": rid, "image": f"{rid}.png", "conversations": turns(q, a)} for rid, _, q, a in rows]
        (tmp_path / "data.json").write_text(json.dumps(records))
        args = [
            "--data",
            "llava",
            "--data-path",
            str(tmp_path / "data.json"),
            "--image-folder",
            str(tmp_path / "images"),
        ]
    else:
        messages = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "text": None, "index": 0},
                        {"type": "text", "text": q, "index": None},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": a, "index": None}]},
            ]
            for _, _, q, a in rows
        ]
        data = datasets.Dataset.from_dict({"messages": messages, "images": [[im] for _, im, _, _ in rows]})
        data.cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(str(tmp_path / "hf"))
        args = ["--data", "hf", "--data-path", str(tmp_path / "hf")]
    results, stdout = run_e2e(tmp_path, args)
    assert "data: 38 training samples, 2 held out, 0 skipped" in stdout
    held = results["metrics"]["heldout"]
    assert held["accuracy"]["count"] == 2 and held["blind"]["count"] == 2 and held["loss"] > 0
    assert {e["truth"] for e in held["examples"]} <= set(COLOURS_E2E)
    assert results["skipped_samples"] == [] and results["training"][0]["steps"] == 3
    assert results["config"]["data"]["kind"] == fmt
