"""The mini world as the README describes it: split sizes, the compositional hold-out, the questions' answers."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from bench.data.world import COLOURS, HELD_OUT, SHAPES, Obj, Scene, World, WorldConfig, generate, render
from connector_zoo.settings import SettingError
from encoders.anyres import AnyResGeometry


@pytest.fixture(scope="module")
def default_scenes():
    """The default world's scenes (sampling only, no rendering: about a second)."""
    cfg = WorldConfig()
    return {split: generate(cfg, split) for split in ("train", "val", "test", "compositional")}


def test_split_sizes_are_the_readme_ones(default_scenes):
    assert {k: len(v) for k, v in default_scenes.items()} == {
        "train": 20000,
        "val": 1000,
        "test": 1000,
        "compositional": 500,
    }
    ids = [s.id for scenes in default_scenes.values() for s in scenes]
    assert len(ids) == len(set(ids))


def test_compositional_pairs_never_occur_outside_their_split(default_scenes):
    for split in ("train", "val", "test"):
        seen = {(o.colour, o.shape) for s in default_scenes[split] for o in s.objects}
        assert not seen & set(HELD_OUT), split
    # every other colour-shape pair is seen in training (so each held-out colour and shape is seen on its own)
    train_pairs = {(o.colour, o.shape) for s in default_scenes["train"] for o in s.objects}
    assert train_pairs == {(c, s) for c in COLOURS for s in SHAPES} - set(HELD_OUT)
    assert all(any((o.colour, o.shape) in HELD_OUT for o in s.objects) for s in default_scenes["compositional"])


def test_answers_follow_from_the_scene(default_scenes):
    """Each question's answer, recomputed from the scene's objects (colour, shape, count and existence types)."""
    for scene in default_scenes["test"][:300]:
        objs = scene.objects
        for qa in scene.qa:
            q, a = qa["question"], qa["answer"]
            if qa["type"] == "colour":
                shape = q.removeprefix("What colour is the ").removesuffix("?")
                assert [o.colour for o in objs if o.shape == shape] == [a]
            elif qa["type"] == "shape":
                colour = q.removeprefix("What shape is the ").removesuffix(" object?")
                assert [o.shape for o in objs if o.colour == colour] == [a]
            elif qa["type"] == "count" and q.startswith("How many objects"):
                assert a == ("zero", "one", "two", "three", "four")[len(objs)]


def test_a_built_world_holds_what_was_generated():
    cfg = WorldConfig().scaled(0.01)
    world = World(cfg, progress=False)
    for split in ("train", "compositional"):
        scenes, records = generate(cfg, split), world.records(split)
        assert [r["id"] for r in records] == [s.id for s in scenes]
        assert [r["qa"] for r in records] == [s.qa for s in scenes]
        assert world.images(split).shape == (getattr(cfg, split), cfg.image_size, cfg.image_size, 3)


def test_qa_turns_put_a_scenes_questions_in_one_conversation_with_every_answer_a_label():
    """``qa_turns=3``: per scene its caption alone and one conversation of its questions, in the record's order, the
    image in the first turn only; the LLM's labels cover each answer (and nothing of the questions). ``qa_turns=1``
    (evaluation, and the default) is one question a sample."""
    from bench.data.formats import world_dataset
    from llms import build_llm
    from llms.base import IMAGE_TOKEN

    world = World(WorldConfig().scaled(0.01), progress=False)
    records = world.records("train")
    single, grouped = world_dataset(world, "train"), world_dataset(world, "train", qa_turns=3)
    assert len(single.samples) == sum(1 + len(r["qa"]) for r in records)
    assert len(grouped.samples) == sum(1 + (len(r["qa"]) + 2) // 3 for r in records)
    backend = build_llm("tinyllama")
    conversations = [s for s in grouped.samples if s.meta["type"] == "conversation"]
    assert len(conversations) == len(records)
    for sample, record in zip(conversations, records):
        users = [m["content"] for m in sample.messages if m["role"] == "user"]
        answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        assert users == [IMAGE_TOKEN + "\n" + record["qa"][0]["question"]] + [q["question"] for q in record["qa"][1:]]
        assert answers == [q["answer"] for q in record["qa"]] and sample.meta["types"] == [
            q["type"] for q in record["qa"]
        ]
        encoded = backend.encode_conversation(sample.messages)
        runs, current = [], []  # the labelled stretches of the sequence, one per answer
        for y in [*encoded.labels, -100]:
            if y != -100:
                current.append(y)
            elif current:
                runs, current = [*runs, current], []
        decoded = [backend.tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs]
        assert decoded == answers  # every answer, in order, and no question word
    with pytest.raises(ValueError, match="qa_turns=0"):
        world_dataset(world, "train", qa_turns=0)


def test_fresh_training_questions_are_the_worlds_generator_seeded_by_scene():
    """``train_questions=7``: each training scene's questions drawn afresh, one of each type its objects allow (count
    and existence always), every answer true of the scene, the same in every call (a stream named by the world's seed,
    the scene id and k; two scenes, or two k, draw differently); the evaluation splits keep their recorded
    questions, and qa_turns groups the fresh ones into one conversation."""
    from bench.data.formats import world_dataset
    from bench.data.world import QUESTION_TYPES, fresh_questions, question_makers

    world = World(WorldConfig().scaled(0.01), progress=False)
    records = world.records("train")
    for r in records:
        qa = fresh_questions(r, 7, world.cfg.seed)
        assert qa == fresh_questions(r, 7, world.cfg.seed)
        objs = [Obj(o["shape"], o["colour"], o["size"], o["cell"]) for o in r["objects"]]
        makers = question_makers(objs, random.Random(0))
        available = {t for t in QUESTION_TYPES if t != "exist" and makers[t]()} | {"exist"}
        assert sorted(q["type"] for q in qa) == sorted(available)  # one of each available type
        for q in qa:
            if q["type"] == "exist":  # drawn from its own random stream: check the answer against the objects
                *_, colour, shape = q["question"].rstrip("?").split(" ")
                assert q["answer"] == ("yes" if (colour, shape) in {(o.colour, o.shape) for o in objs} else "no")
            else:
                assert (q["question"], q["answer"]) in makers[q["type"]]()
    draws = [tuple(q["question"] for q in fresh_questions(r, 7)) for r in records]
    assert len(set(draws)) > len(draws) // 2  # scenes draw on their own streams, not one shared order
    assert fresh_questions(records[0], 7, seed=1) != fresh_questions(records[0], 7) or len(records[0]["objects"]) == 1
    fresh = world_dataset(world, "train", qa_turns=7, fresh_questions=7)
    conversations = [s for s in fresh.samples if s.meta["type"] == "conversation"]
    assert [s.meta["types"] for s in conversations] == [
        [q["type"] for q in fresh_questions(r, 7, world.cfg.seed)] for r in records
    ]
    assert sum(s.meta["type"] == "caption" for s in fresh.samples) == len(records)
    test = world_dataset(world, "test")
    assert [s.meta["answer"] for s in test.samples if s.meta["type"] != "caption"] == [
        q["answer"] for r in world.records("test") for q in r["qa"]
    ]
    with pytest.raises(ValueError, match="train_questions=0"):
        world_dataset(world, "train", fresh_questions=0)


def test_patch_labels_by_hand():
    """64-px image, 8-px patches: a large square centred at (30, 34) has half-width 64/3 * 0.38 = 8.1 px, so the
    patch centres 28 and 36 of both axes are covered (2x2 patches); a small circle centred at (60, 4) (half-width 3.4)
    covers no patch centre and labels the patch it lies in."""
    from bench.data.world import patch_labels

    record = {
        "objects": [
            {"colour": "orange", "shape": "square", "size": "large", "x": 30.0, "y": 34.0},
            {"colour": "red", "shape": "circle", "size": "small", "x": 60.0, "y": 4.0},
        ]
    }
    labels = patch_labels(record, 64, 8)
    square = (list(COLOURS).index("orange") + 1, SHAPES.index("square") + 1, 2)
    circle = (list(COLOURS).index("red") + 1, SHAPES.index("circle") + 1, 1)
    expected = {(r, c): square for r in (3, 4) for c in (3, 4)} | {(0, 7): circle}
    for r in range(8):
        for c in range(8):
            assert tuple(labels[r, c]) == expected.get((r, c), (0, 0, 0)), (r, c)


def test_each_encoder_recipe_is_its_own_cached_encoder():
    """The world encoder's directory is keyed by every setting of its recipe: with and without the dense objective,
    with and without the position objective, and two recipes that differ only in the learning rate (which the name's
    readable part does not show)."""
    from bench.train.pretrain import pretrain_encoder

    world = World(WorldConfig().scaled(0.01), progress=False)
    plain, dense = pretrain_encoder("clip", world, steps=2, dense=0.0), pretrain_encoder("clip", world, steps=2)
    assert plain != dense and "-dense4-" in dense.name and "-dense" not in plain.name
    placed = pretrain_encoder("clip", world, steps=2, position=1.0)  # with the position objective (off by default)
    assert "-dense4-pos1-" in placed.name and "-pos" not in dense.name and placed != dense
    assert (placed / "model.safetensors").read_bytes() != (dense / "model.safetensors").read_bytes()
    assert (plain / "model.safetensors").read_bytes() != (dense / "model.safetensors").read_bytes()
    slower = pretrain_encoder("clip", world, steps=2, lr=1e-4)
    assert slower != dense and slower.name.rsplit("-", 1)[0] == dense.name.rsplit("-", 1)[0]
    assert (slower / "model.safetensors").read_bytes() != (dense / "model.safetensors").read_bytes()


def test_recolouring_a_batch_is_rendering_its_scenes_in_the_permuted_colours():
    """``recolour_batch`` against the world's own drawing: each recoloured image equals the same scene rendered with
    every object's colour replaced by its permuted one, and its caption and dense labels equal that scene's caption
    and ``patch_labels``. The permutations are the ones ``random.shuffle`` draws from the given generator, one per
    image in order; shape and size labels and the background stay as they were."""
    import dataclasses
    import random

    import torch

    from bench.data.world import caption, patch_labels, sample_scene
    from bench.train.pretrain import recolour_batch

    cfg, rng = WorldConfig(), random.Random(5)
    scenes = [sample_scene(rng, cfg, f"s{i}", compositional=False) for i in range(12)]
    record = lambda scene: {"objects": [dataclasses.asdict(o) for o in scene.objects]}  # noqa: E731
    pixels = np.stack([np.asarray(render(s, cfg)) for s in scenes])
    labels = torch.from_numpy(np.stack([patch_labels(record(s), 64, 8) for s in scenes]))
    corners = [(3 * b % 33, 5 * b % 33) for b in range(len(scenes))]  # a 32-px tile of each (--world-encoder-px 32)
    tile = lambda rec, b: patch_labels(rec, 32, 8, cfg.object_scale, 64, (*corners[b], 32))  # noqa: E731
    tiles = torch.from_numpy(np.stack([tile(record(s), b) for b, s in enumerate(scenes)]))
    out, texts, new_labels, new_tiles = recolour_batch(
        pixels, [s.caption for s in scenes], labels, random.Random(9), tiles
    )
    twin, names, changed = random.Random(9), list(COLOURS), 0
    for b, scene in enumerate(scenes):
        perm = list(range(len(names)))
        twin.shuffle(perm)
        swap = {names[k]: names[perm[k]] for k in range(len(names))}
        painted = Scene(scene.id, [dataclasses.replace(o, colour=swap[o.colour]) for o in scene.objects])
        np.testing.assert_array_equal(out[b], np.asarray(render(painted, cfg)))
        assert texts[b] == caption(painted)
        np.testing.assert_array_equal(new_labels[b].numpy(), patch_labels(record(painted), 64, 8))
        np.testing.assert_array_equal(new_tiles[b].numpy(), tile(record(painted), b))  # the same image's permutation
        changed += int(texts[b] != scene.caption)
    assert changed >= 10  # the permutations moved colours (identity for all 7 colours of a scene is rare)
    assert torch.equal(new_labels[..., 1:], labels[..., 1:])
    np.testing.assert_array_equal(pixels[0], np.asarray(render(scenes[0], cfg)))  # the input is left as it was


def test_a_recoloured_encoder_is_its_own_encoder_and_the_default_keeps_its_name():
    from bench.train.pretrain import encoder_dir_name

    assert encoder_dir_name("clip") == "encoder-clip-s600-b256-seed0-dense4-effe7c7289"  # every recorded cell's
    recoloured = encoder_dir_name("clip", recolour=True)
    assert "-dense4-recolour-" in recoloured and recoloured.rsplit("-", 1)[1] != "effe7c7289"


def test_dense_loss_reads_shape_and_size_on_object_patches_only():
    """By hand: colour (with background as class 0) over every patch, shape and size over covered patches only; a
    background patch has no shape or size to learn."""
    import torch
    from torch import nn

    from bench.train.pretrain import dense_loss

    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(4, 8), nn.Linear(4, 3), nn.Linear(4, 2)])
    patches = torch.randn(1, 3, 4)
    target = torch.tensor([[[0, 0, 0], [3, 2, 1], [5, 3, 2]]])  # background, (colour 3, square, small), (5, tri, large)
    ce = nn.functional.cross_entropy
    colour = ce(heads[0](patches[0]), torch.tensor([0, 3, 5]))
    shape = ce(heads[1](patches[0, 1:]), torch.tensor([1, 2]))
    size = ce(heads[2](patches[0, 1:]), torch.tensor([0, 1]))
    assert torch.allclose(dense_loss(heads, patches, target), (colour + shape + size) / 3)
    background = torch.zeros_like(target)  # an image with no object: the colour term alone, at the same scale
    assert torch.allclose(dense_loss(heads, patches, background), ce(heads[0](patches[0]), torch.zeros(3).long()) / 3)


def test_position_loss_reads_each_tokens_own_row_and_column():
    """By hand on a 2x3 grid (not square, so rows and columns cannot be swapped unnoticed): in raster order the tokens'
    rows are 0 0 0 1 1 1 and their columns 0 1 2 0 1 2, the same for every image of the batch."""
    import torch
    from torch import nn

    from bench.train.pretrain import position_loss

    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])
    patches = torch.randn(2, 6, 4)
    ce = nn.functional.cross_entropy
    rows, cols = torch.tensor([0, 0, 0, 1, 1, 1] * 2), torch.tensor([0, 1, 2, 0, 1, 2] * 2)
    expected = (ce(heads[0](patches.flatten(0, 1)), rows) + ce(heads[1](patches.flatten(0, 1)), cols)) / 2
    assert torch.allclose(position_loss(heads, patches), expected)
    # tokens that carry their own row and column one-hot, heads that read them off: the loss vanishes in raster order
    tokens = torch.cat([nn.functional.one_hot(rows, 2), nn.functional.one_hot(cols, 3)], -1).float().view(2, 6, 5)
    readers = nn.ModuleList([nn.Linear(5, 2), nn.Linear(5, 3)])
    with torch.no_grad():
        for head, block in zip(readers, (torch.eye(5)[:2], torch.eye(5)[2:])):
            head.weight.copy_(50 * block), head.bias.zero_()
    assert position_loss(readers, tokens) < 1e-6
    assert position_loss(readers, tokens.flip(1)) > 10  # the tokens in another order: far from their targets


def test_the_wide_world_llm_reads_scene_text_with_labels_on_the_answers():
    """The ``wide`` level's text: every caption and blind question as at ``small``, plus each training question asked
    of its scene's caption and extra existence / relation questions whose answers follow from the scene's objects;
    only the assistant turns are labels. ``small`` stays the plain language model (every token a label)."""
    from bench.train.world_llm import lm_conversations
    from llms import build_llm

    world = World(WorldConfig().scaled(0.01), progress=False)
    backend = build_llm("tinyllama")
    records = world.records("train")
    small = lm_conversations(world, backend)
    assert len(small) == sum(1 + len(r["qa"]) for r in records) and isinstance(small[0][0], int)
    wide = lm_conversations(world, backend, scene_qa=3)
    decode = lambda ids: backend.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    turns = [
        (decode([t for t, y in zip(ids, labels) if y == -100]), decode([y for y in labels if y != -100]))
        for ids, labels in wide
    ]
    assert all(answer for _, answer in turns)  # every sequence has labels, on its answer only
    captions = {r["caption"]: {(o["colour"], o["shape"]) for o in r["objects"]} for r in records}
    asked = [(p, a) for p, a in turns if p.split("\n")[1] in captions and "Is there a" in p]  # <|user|>\ncaption\n..
    for prompt, answer in asked:
        present = captions[prompt.split("\n")[1]]
        colour, shape = prompt.split("Is there a ")[1].split("?")[0].split()
        assert answer == ("yes" if (colour, shape) in present else "no"), prompt
        assert answer not in prompt.split("?")[-1]  # the answer is a label, never in the prompt
    assert len(asked) >= 3 * len(records)
    assert len(wide) - len(small) >= sum(len(r["qa"]) + 3 for r in records)


def test_each_world_llm_level_is_its_own_cached_llm():
    """``--world-llm wide`` names another directory (a d=256 model) than the default, and a run config's
    ``data.pretrain.llm_level`` reaches both the LLM that is built and the backbones a sweep compares."""
    import json

    from bench.train.pretrain import world_backbones
    from bench.train.settings import RunConfig
    from bench.train.world_llm import llm_dir_name, pretrain_llm

    world = World(WorldConfig().scaled(0.01), progress=False)
    small, wide = pretrain_llm("tinyllama", world, steps=2), pretrain_llm("tinyllama", world, steps=2, level="wide")
    assert small != wide and "-wide-" in wide.name
    assert json.loads((wide / "config.json").read_text())["hidden_size"] == 256
    assert json.loads((small / "config.json").read_text())["hidden_size"] == 128
    cfg = RunConfig(data={"kind": "world", "pretrain": {"llm_level": "wide"}})
    assert world_backbones(cfg)["llm"] == llm_dir_name("tinyllama", level="wide") != world_backbones(RunConfig())["llm"]
    with pytest.raises(ValueError, match="level 'huge' is unknown; known: small, wide"):
        pretrain_llm("tinyllama", world, level="huge")


def test_object_scale_is_a_new_world_and_the_default_world_keeps_its_key():
    # the key every cached world, backbone and sweep record of the default world was made under (before the setting)
    assert WorldConfig().key() == "e6f2ee5e299a" == WorldConfig(object_scale=1.0).key()
    assert WorldConfig(image_size=128).key() == "10a7b1c95794"
    assert WorldConfig(image_size=192, object_scale=0.25).key() != WorldConfig(image_size=192).key()
    assert (
        "object_scale" not in WorldConfig().as_dict() and WorldConfig(object_scale=0.5).as_dict()["object_scale"] == 0.5
    )
    with pytest.raises(SettingError, match="object_scale"):
        WorldConfig(object_scale=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_small_objects_of_a_scaled_world_are_legible_only_at_its_own_resolution(shape):
    """At 192 px with objects a quarter of their size, a small object keeps 20-40 pixels of its own colour; resized to
    a 64-px encoder's input (bicubic, as the processors do) it keeps none: what one resized view loses and AnyRes's
    native-resolution tiles keep."""
    cfg = WorldConfig(image_size=192, object_scale=0.25)
    image = render(Scene("x", [Obj(shape, "red", "small", 4, x=96.3, y=95.7)]), cfg)
    red = np.array(COLOURS["red"], float)

    def own_pixels(im) -> int:
        return int((np.linalg.norm(np.asarray(im).astype(float) - red, axis=-1) < 30).sum())

    assert own_pixels(image) >= 20
    assert own_pixels(image.resize((64, 64), Image.BICUBIC)) == 0
    tiles = AnyResGeometry(((192, 192),), 64).views(image)[1:]  # 3x3 tiles at the image's own resolution
    assert sum(own_pixels(t) for t in tiles) == own_pixels(image)
    default = render(Scene("x", [Obj(shape, "red", "small", 4, x=32.1, y=31.9)]), WorldConfig())
    assert own_pixels(default) >= 20  # the default world's small objects, at 64 px, are as legible as these at 192


def test_patch_labels_of_a_resized_view_and_of_a_crop_by_hand():
    """The test above's scene drawn at 192 px (everything x3): resized to 64 px it labels the same patches as the
    64-px scene; a 64-px square cut at (top 72, left 60) of it shows the large square (centre (90, 102) -> (30, 30)
    in the crop, half-width 24.3 px: patch centres 12 .. 52, rows and columns 1..6) and not the circle (outside)."""
    from bench.data.world import patch_labels

    record = {
        "objects": [
            {"colour": "orange", "shape": "square", "size": "large", "x": 90.0, "y": 102.0},
            {"colour": "red", "shape": "circle", "size": "small", "x": 180.0, "y": 12.0},
        ]
    }
    small = {"objects": [dict(o, x=o["x"] / 3, y=o["y"] / 3) for o in record["objects"]]}
    np.testing.assert_array_equal(patch_labels(record, 64, 8, world_size=192), patch_labels(small, 64, 8))
    crop = patch_labels(record, 64, 8, world_size=192, crop=(72, 60, 64))
    square = (list(COLOURS).index("orange") + 1, SHAPES.index("square") + 1, 2)
    for r in range(8):
        for c in range(8):
            assert tuple(crop[r, c]) == (square if 1 <= r <= 6 and 1 <= c <= 6 else (0, 0, 0)), (r, c)


def test_a_world_encoder_at_a_smaller_input_is_its_own_encoder_and_sees_tiles():
    from bench.train.pretrain import pretrain_encoder, world_backbones
    from bench.train.settings import RunConfig
    from encoders import build_encoder

    cfg = WorldConfig(image_size=128, object_scale=0.5).scaled(0.01)
    world = World(cfg, progress=False)
    native = pretrain_encoder("clip", world, steps=2, log=lambda *a: None)
    small = pretrain_encoder("clip", world, steps=2, input_px=64, log=lambda *a: None)
    assert small != native and "-px64-" in small.name and "-px" not in native.name
    assert pretrain_encoder("clip", world, steps=2, input_px=128, log=lambda *a: None) == native
    assert (
        build_encoder("clip", str(small)).info.image_size == 64
        and build_encoder("clip", str(native)).info.image_size == 128
    )
    run = RunConfig(data={"kind": "world", "world": cfg.as_dict(), "pretrain": {"encoder_steps": 2, "encoder_px": 64}})
    assert world_backbones(run)["encoder"] == small.name
    with pytest.raises(ValueError, match="no larger than the world's 128-px images"):
        pretrain_encoder("clip", world, steps=2, input_px=192, log=lambda *a: None)


def test_the_pretrained_level_pretrains_a_recoloured_encoder_unless_told_otherwise():
    """``--world-llm smollm2`` builds its world encoder with ``recolour`` (RECOLOURED_LEVELS), ``--no-world-encoder-
    recolour`` turns it off there, ``--world-encoder-recolour`` turns it on at the default level; the backbones a run
    records name the encoder it builds, and a recoloured one is another file than the plain one."""
    from bench.cli import COMMANDS
    from bench.cli.common import data_from_args
    from bench.cli.parser import build_parser
    from bench.train.pretrain import ENCODER_STEPS, encoder_dir_name, pretrain_encoder, steps, world_backbones
    from bench.train.settings import RunConfig

    parser = build_parser(COMMANDS)
    plain, recoloured = encoder_dir_name("clip"), encoder_dir_name("clip", recolour=True)
    # the level pretrains its encoder for 2,000 steps (LEVEL_ENCODER_STEPS), the others for ENCODER_STEPS;
    # --pretrain-steps overrides both
    level, level_plain = encoder_dir_name("clip", 2000, recolour=True), encoder_dir_name("clip", 2000)
    assert ENCODER_STEPS == 600 and "-s600-" in plain and "-s2000-" in level
    for flags, name in (
        ([], plain),
        (["--world-llm", "smollm2"], level),
        (["--world-llm", "smollm2", "--no-world-encoder-recolour"], level_plain),
        (["--world-llm", "smollm2", "--pretrain-steps", "7"], encoder_dir_name("clip", 7, recolour=True)),
        (["--world-encoder-recolour"], recoloured),
        (["--world-llm", "wide"], plain),
    ):
        args = parser.parse_args(["run", "--connector", "linear", *flags])
        assert world_backbones(RunConfig(data=data_from_args(args)))["encoder"] == name, flags
    world = World(WorldConfig().scaled(0.01), progress=False)
    quiet = lambda *a: None  # noqa: E731
    a = pretrain_encoder("clip", world, **steps({"encoder_steps": 2}, "encoder"), log=quiet)
    b = pretrain_encoder("clip", world, **steps({"encoder_steps": 2, "llm_level": "smollm2"}, "encoder"), log=quiet)
    assert "-recolour-" in b.name and "-recolour" not in a.name
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    # at a smaller input (the resolution direction's --world-encoder-px 32) the native-resolution tiles are cut from
    # the recoloured images (their labels recoloured alike: the recolouring test above)
    small = pretrain_encoder("clip", world, steps=2, recolour=True, input_px=32, log=quiet)
    assert "-px32-recolour-" in small.name


def test_world_build_pretrains_the_backbones_a_run_with_the_same_options_builds(monkeypatch, tmp_path):
    """``bench world build`` asks for the encoder and LLM that ``bench run`` with the same world options would build
    (it passed none of ``--world-encoder-px`` before, and the pretrained level's encoder is recoloured)."""
    import bench.train.pretrain as pretrain
    import bench.train.world_llm as world_llm
    from bench.cli import COMMANDS
    from bench.cli.common import data_from_args
    from bench.cli.parser import build_parser
    from bench.cli.training import cmd_world_build
    from bench.train.settings import RunConfig

    asked = []
    monkeypatch.setattr(pretrain, "pretrain_encoder", lambda name, world, **kw: asked.append(("encoder", kw)) or "e")
    monkeypatch.setattr(world_llm, "pretrain_llm", lambda name, world, **kw: asked.append(("llm", kw)) or "l")
    monkeypatch.setattr("bench.evaluate.lmms.world_task_data", lambda world: tmp_path, raising=False)
    parser = build_parser(COMMANDS)
    for flags in (["--world-llm", "smollm2"], ["--world-encoder-px", "32"], []):
        asked.clear()
        common = ["--world-scale", "0.01", *flags]
        cmd_world_build(parser.parse_args(["world", "build", *common]))
        run = RunConfig(data=data_from_args(parser.parse_args(["run", "--connector", "linear", *common])))
        want = pretrain.world_backbones(run)
        (_, enc), (_, llm) = asked
        assert pretrain.encoder_dir_name("clip", **enc) == want["encoder"], flags
        assert world_llm.llm_dir_name("tinyllama", **llm) == want["llm"], flags
