"""The embedded mini world: a small, fully deterministic CLEVR-like vision-language world that runs offline.

Images (default 64x64 RGB) hold 1-4 objects: a shape (circle, square, triangle), a colour (7), a size (small, large)
and a cell of a 3x3 grid (jittered). Small objects are the detail a lossy connector drops. For each image: a caption
and question-answer pairs of seven types (colour, shape, size, count, position, exist, relation) with one- or two-word
answers. Splits come from fixed seeds: train / val / test, plus a *compositional* split whose images each contain at
least one colour-shape combination that never occurs in train, val or test.

Only looking at the image answers the questions: the blind baseline (the same LLM without the image) gives the floor.

``object_scale`` shrinks every object by that factor (its radius), so that at a larger ``image_size`` the objects keep
a few pixels of their own while a view resized to the encoder's input loses them: the world where resolution matters
(AnyRes tiling against one resized view; issue 38). Its default, 1, is the world as it always was (and its key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from connector_zoo.io import cache_dir, materialize, show_progress
from connector_zoo.io import progress as bars
from connector_zoo.settings import SettingError, check

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
#: an object's half-width as a fraction of a grid cell (a third of the image side)
RADIUS = {"small": 0.16, "large": 0.38}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
QUESTION_TYPES = ("colour", "shape", "size", "count", "position", "exist", "relation")
NUMBERS = ("zero", "one", "two", "three", "four")
# colour-shape pairs that never appear in train/val/test, only in the compositional split
HELD_OUT = (("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("cyan", "circle"))


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    train: int = 20000
    val: int = 1000
    test: int = 1000
    compositional: int = 500
    max_objects: int = 4
    questions_per_image: int = 3
    seed: int = 0
    background: tuple[int, int, int] = (235, 235, 235)
    #: the objects' size relative to the default world's (their radius as a share of a grid cell, times this)
    object_scale: float = 1.0

    def __post_init__(self) -> None:
        # read back from a run's config.json the background is a JSON list: the same world, so the same tuple
        if isinstance(self.background, list):
            object.__setattr__(self, "background", tuple(self.background))
        check("world", "image_size", self.image_size, int, lo=16, hi=1024)
        if self.image_size % 8:
            raise SettingError(
                f"world: image_size={self.image_size} must be a multiple of 8 (its encoders' patches "
                f"are 8 px: 64 gives 8x8 patches, 128 gives 16x16)"
            )
        for name in ("train", "val", "test", "compositional"):
            check("world", name, getattr(self, name), int, lo=1)
        check("world", "max_objects", self.max_objects, int, lo=1, hi=9)
        check("world", "questions_per_image", self.questions_per_image, int, lo=1)
        check("world", "seed", self.seed, int, lo=0)
        check("world", "background", self.background, list)
        if len(self.background) != 3:
            raise SettingError(f"world: background={list(self.background)} must be 3 integers in [0, 255]")
        for v in self.background:
            check("world", "background[]", v, int, lo=0, hi=255)
        if isinstance(self.object_scale, int) and not isinstance(self.object_scale, bool):
            object.__setattr__(self, "object_scale", float(self.object_scale))
        check("world", "object_scale", self.object_scale, float, lo=0, hi=1, lo_open=True)

    def as_dict(self) -> dict[str, Any]:
        """The settings as a run config keeps them: a setting added later is left out at its default, so the worlds
        (and runs, and sweep cells) recorded before it existed are the same worlds."""
        out = dataclasses.asdict(self)
        if out["object_scale"] == 1.0:
            del out["object_scale"]
        return out

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def scaled(self, factor: float) -> WorldConfig:
        """A smaller world (tests): every split scaled by ``factor``."""
        n = lambda v: max(8, int(v * factor))  # noqa: E731
        return dataclasses.replace(
            self, train=n(self.train), val=n(self.val), test=n(self.test), compositional=n(self.compositional)
        )


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cell: int
    x: float = 0.0
    y: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    id: str
    objects: list[Obj]
    qa: list[dict[str, str]] = field(default_factory=list)
    caption: str = ""


# ------------------------------------------------------------------ scenes
def sample_scene(rng: random.Random, cfg: WorldConfig, idx: str, compositional: bool) -> Scene:
    while True:
        n = rng.randint(1, cfg.max_objects)
        cells = rng.sample(range(9), n)
        objects = [Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), c) for c in cells]
        held = [(o.colour, o.shape) in HELD_OUT for o in objects]
        if (compositional and any(held)) or (not compositional and not any(held)):
            break
    cell_px = cfg.image_size / 3
    for o in objects:
        row, col = divmod(o.cell, 3)
        jitter = cell_px * 0.12
        o.x = (col + 0.5) * cell_px + rng.uniform(-jitter, jitter)
        o.y = (row + 0.5) * cell_px + rng.uniform(-jitter, jitter)
    scene = Scene(idx, objects)
    scene.caption = caption(scene)
    scene.qa = questions(scene, rng, cfg.questions_per_image)
    return scene


def render(scene: Scene, cfg: WorldConfig) -> Image.Image:
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), cfg.background)
    draw = ImageDraw.Draw(img)
    cell_px = cfg.image_size / 3
    for o in scene.objects:
        r = cell_px * RADIUS[o.size] * cfg.object_scale
        box = (o.x - r, o.y - r, o.x + r, o.y + r)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(o.x, o.y - r), (o.x - r, o.y + r), (o.x + r, o.y + r)], fill=fill)
    return img


def patch_labels(
    record: dict[str, Any],
    image_size: int,
    patch: int,
    object_scale: float = 1.0,
    world_size: int | None = None,
    crop: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """(grid, grid, 3) int: per patch, 1 + the index of the colour, shape and size of the object whose box covers the
    patch's centre, or whose centre lies in the patch (a small object may cover no patch centre); 0: background. For
    dense pretraining of the world's encoders.

    The view is ``image_size`` pixels a side and shows the whole ``world_size``-pixel image (default: the same size),
    or with ``crop`` = (top, left, side) that square of it, in world pixels."""
    world_size = world_size or image_size
    top, left, extent = crop or (0, 0, world_size)
    k = image_size / extent  # view pixels per world pixel
    side = image_size // patch
    out = np.zeros((side, side, 3), np.int64)
    centres = (np.arange(side) + 0.5) * patch
    for o in record["objects"]:
        r = world_size / 3 * RADIUS[o["size"]] * object_scale * k
        y, x = (o["y"] - top) * k, (o["x"] - left) * k
        rows, cols = np.abs(centres - y) <= r, np.abs(centres - x) <= r
        if 0 <= y < image_size and 0 <= x < image_size:  # the centre's own patch, when the view holds the centre
            rows[min(side - 1, int(y // patch))] = cols[min(side - 1, int(x // patch))] = True
        out[np.ix_(rows, cols)] = (
            list(COLOURS).index(o["colour"]) + 1,
            SHAPES.index(o["shape"]) + 1,
            SIZES.index(o["size"]) + 1,
        )
    return out


def caption(scene: Scene) -> str:
    parts = [f"a {o.name} at the {CELLS[o.cell]}" for o in sorted(scene.objects, key=lambda o: o.cell)]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def unique_by(objects: list[Obj], attr: str) -> list[Obj]:
    values = [getattr(o, attr) for o in objects]
    return [o for o in objects if values.count(getattr(o, attr)) == 1]


def question_makers(objs: list[Obj], rng: random.Random) -> dict[str, Any]:
    """Per question type, a function giving every (question, answer) of that type about ``objs`` (existence: one,
    drawn from ``rng`` at each call)."""
    return {
        "colour": lambda: [(f"What colour is the {o.shape}?", o.colour) for o in unique_by(objs, "shape")],
        "shape": lambda: [(f"What shape is the {o.colour} object?", o.shape) for o in unique_by(objs, "colour")],
        "size": lambda: [
            (f"What size is the {o.colour} {o.shape}?", o.size)
            for o in objs
            if [(p.colour, p.shape) for p in objs].count((o.colour, o.shape)) == 1
        ],
        "count": lambda: (
            [("How many objects are there?", NUMBERS[len(objs)])]
            + [
                (f"How many {c} objects are there?", NUMBERS[sum(o.colour == c for o in objs)])
                for c in sorted({o.colour for o in objs})
            ]
        ),
        "position": lambda: [
            (f"Where is the {o.colour} {o.shape}?", CELLS[o.cell])
            for o in objs
            if [(p.colour, p.shape) for p in objs].count((o.colour, o.shape)) == 1
        ],
        "exist": lambda: exist_questions(objs, rng),
        "relation": lambda: relation_questions(objs),
    }


def questions(scene: Scene, rng: random.Random, k: int) -> list[dict[str, str]]:
    """k question-answer pairs of distinct types where possible; answers are one or two words."""
    makers = question_makers(scene.objects, rng)
    types = list(QUESTION_TYPES)
    rng.shuffle(types)
    out = []
    for qtype in types:
        options = makers[qtype]()
        if options:
            q, a = rng.choice(options)
            out.append({"type": qtype, "question": q, "answer": a})
        if len(out) == k:
            break
    return out


def fresh_questions(record: dict[str, Any], k: int, seed: int = 0) -> list[dict[str, str]]:
    """``k`` questions about a recorded scene drawn afresh by the world's own generator (``questions``: distinct types
    while types last, in a random order), from a random stream named by the world's seed, the scene's id and ``k``, so
    the same scene gets the same questions in every process and run. For training only (``--train-questions``): the
    splits a run is scored on keep the questions the world recorded."""
    objs = [Obj(o["shape"], o["colour"], o["size"], o["cell"], o["x"], o["y"]) for o in record["objects"]]
    rng = random.Random(f"world-seed-{seed}/{record['id']}/questions-{k}")
    return questions(Scene(record["id"], objs), rng, k)


def exist_questions(objs: list[Obj], rng: random.Random) -> list[tuple[str, str]]:
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
        return [(f"Is there a {c} {s}?", "yes")]
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and (c, s) not in HELD_OUT]
    c, s = rng.choice(absent)
    return [(f"Is there a {c} {s}?", "no")]


def relation_questions(objs: list[Obj]) -> list[tuple[str, str]]:
    named = [o for o in objs if [(p.colour, p.shape) for p in objs].count((o.colour, o.shape)) == 1]
    out = []
    for a in named:
        for b in named:
            ra, ca = divmod(a.cell, 3)
            rb, cb = divmod(b.cell, 3)
            if a is b:
                continue
            if ca != cb:
                out.append(
                    (f"Is the {a.colour} {a.shape} left of the {b.colour} {b.shape}?", "yes" if ca < cb else "no")
                )
            if ra != rb:
                out.append((f"Is the {a.colour} {a.shape} above the {b.colour} {b.shape}?", "yes" if ra < rb else "no"))
    return out


# ----------------------------------------------------------------- the world
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3, "compositional": 4}


def generate(cfg: WorldConfig, split: str) -> list[Scene]:
    rng = random.Random(cfg.seed * 1000 + SPLIT_SEEDS[split])
    n = getattr(cfg, split)
    return [sample_scene(rng, cfg, f"{split}-{i:06d}", split == "compositional") for i in range(n)]


def world_dir(cfg: WorldConfig) -> Path:
    return cache_dir() / "world" / f"world-{cfg.key()}"


def build_world(cfg: WorldConfig, progress: bool = True) -> Path:
    """Write images (uint8 .npy per split) and records (JSON) once; reused afterwards."""

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        for split in SPLIT_SEEDS:
            scenes = generate(cfg, split)
            images = np.stack(
                [
                    np.asarray(render(s, cfg))
                    for s in bars(
                        scenes, desc=f"world {split}", disable=not (progress and show_progress()), leave=False
                    )
                ]
            )
            np.save(tmp / f"{split}_images.npy", images)
            records = [
                {"id": s.id, "caption": s.caption, "qa": s.qa, "objects": [dataclasses.asdict(o) for o in s.objects]}
                for s in scenes
            ]
            (tmp / f"{split}.json").write_text(json.dumps(records))

    return materialize(world_dir(cfg), build)


class World:
    """A built world on disk: images memory-mapped, records in memory."""

    def __init__(self, cfg: WorldConfig | None = None, progress: bool = True):
        self.cfg = cfg or WorldConfig()
        self.dir = build_world(self.cfg, progress)
        self._images: dict[str, np.ndarray] = {}
        self._records: dict[str, list[dict[str, Any]]] = {}

    def images(self, split: str) -> np.ndarray:
        if split not in self._images:
            self._images[split] = np.load(self.dir / f"{split}_images.npy", mmap_mode="r")
        return self._images[split]

    def records(self, split: str) -> list[dict[str, Any]]:
        if split not in self._records:
            self._records[split] = json.loads((self.dir / f"{split}.json").read_text())
        return self._records[split]

    def image(self, split: str, index: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.images(split)[index]))

    def text_corpus(self) -> list[str]:
        """Captions, questions and answers of the training split (LLM pretraining and tokenizers)."""
        out = []
        for r in self.records("train"):
            out.append(r["caption"])
            out.extend(f"{qa['question']} {qa['answer']}" for qa in r["qa"])
        return out
