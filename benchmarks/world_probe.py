"""What the mini world's frozen encoder makes readable: a linear probe per grid cell, per attribute.

    python benchmarks/world_probe.py [--encoder clip] [--layer -2] [--train 6000] [--test 1000] [--steps 300]
                                     [--dense 4] [--encoder-steps 600] [--encoder-lr 3e-3] [--recolour] [--per-token]

The world's pretrained encoder (built on first use, like ``bench run``) encodes ``--train`` training and ``--test``
test images; for each attribute (colour, shape, size) and each of the 9 grid cells, a linear classifier on all patch
features of the selected layer (standardised) predicts the attribute of the object in that cell (or "none"), trained
with Adam on the training images. Printed: test accuracy over the cells that hold an object, per attribute, and for
shape split by object size; and the same probes on the compositional split, scored on the objects whose colour-shape
pair never occurs in training (``HELD_OUT``): whether the encoder itself says "red circle" when it has only seen red
squares and blue circles (``probe_accuracy_unseen_pairs``). A VLM cannot answer a question type above what its
encoder makes readable; far below it, the connector and the LLM are the limit (see docs/mini-world.md, the world's
ceiling).

``--per-token`` asks a harder question: one linear classifier shared by all patch tokens predicts what lies under each
token (``patch_labels``), scored on the tokens an object covers. A per-token projector (mlp2x_gelu) hands the LLM
each token on its own, so what a single token does not say the LLM must assemble across tokens. Its ``row`` and
``column`` say whether a token knows where it is (its grid row and column, the answer of a position question and half
of a relation question, once the LLM has found the object's tokens). ``--dense`` and
``--encoder-steps`` choose the world encoder's pretraining (``pretrain_encoder``'s dense objective and its steps).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bench.data.world import COLOURS, HELD_OUT, SHAPES, SIZES, World, WorldConfig, patch_labels
from bench.train.pretrain import ENCODER_DENSE, ENCODER_LR, ENCODER_POSITION, ENCODER_STEPS, pretrain_encoder
from encoders import build_encoder


@torch.no_grad()
def patch_tokens(world: World, enc, split: str, n: int) -> torch.Tensor:
    """(n, N, D) float: the selected layer's patch tokens of the split's first n images, in chunks of 256."""
    chunks = [
        enc(enc.preprocess([world.image(split, j) for j in range(s, min(n, s + 256))])).patches.float()
        for s in range(0, n, 256)
    ]
    return torch.cat(chunks)


def features_and_labels(world: World, enc, split: str, n: int):
    """Flattened patch features of the split's first n images, and per attribute a (n, 9) label of each grid cell's
    object (0: none); label "held_out" marks the cells whose object is a colour-shape pair never seen in training."""
    n = min(n, len(world.records(split)))
    features = patch_tokens(world, enc, split, n).flatten(1)
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}
    labels = {k: torch.zeros(n, 9, dtype=torch.long) for k in [*values, "held_out"]}
    for j, record in enumerate(world.records(split)[:n]):
        for o in record["objects"]:
            for k, names in values.items():
                labels[k][j, o["cell"]] = names.index(o[k]) + 1  # 0 = no object in the cell
            labels["held_out"][j, o["cell"]] = int((o["colour"], o["shape"]) in HELD_OUT)
    return features, labels


def per_token_probe(world: World, enc, n_train: int, n_test: int, steps: int) -> dict[str, float]:
    """Accuracy of one linear classifier over single patch tokens, on the tokens an object covers."""

    def tokens(split: str, n: int):
        n = min(n, len(world.records(split)))
        x = patch_tokens(world, enc, split, n)
        patch = enc.info.image_size // enc.info.grid[0]
        y = torch.from_numpy(np.stack([patch_labels(r, enc.info.image_size, patch) for r in world.records(split)[:n]]))
        rows, cols = torch.meshgrid(torch.arange(y.shape[1]), torch.arange(y.shape[2]), indexing="ij")
        where = torch.stack([rows, cols], -1).expand(n, -1, -1, -1)  # each token's own grid row and column
        return x.flatten(0, 1), torch.cat([y, where], -1).flatten(0, 2)

    (x_train, y_train), (x_test, y_test) = tokens("train", n_train), tokens("test", n_test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out: dict[str, float] = {}
    for k, name in enumerate(("colour", "shape", "size", "row", "column")):
        probe = torch.nn.Linear(x_train.shape[1], int(y_train[:, k].max()) + 1)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(probe(x_train), y_train[:, k])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            right = probe(x_test).argmax(-1) == y_test[:, k]
        on_object = y_test[:, 0] > 0  # row and column: scored on object tokens too, the ones a question asks about
        out[name] = float(right[on_object].float().mean())
        if name == "shape":
            for i, size in enumerate(SIZES):
                out[f"shape ({size} objects)"] = float(right[on_object & (y_test[:, 2] == i + 1)].float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="clip")
    ap.add_argument("--layer", type=int, default=-2)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--world-resolution", type=int, default=64)
    ap.add_argument(
        "--dense", type=float, default=ENCODER_DENSE, help="the encoder's dense pretraining weight (0: off)"
    )
    ap.add_argument("--encoder-steps", type=int, default=ENCODER_STEPS, help="the encoder's pretraining steps")
    ap.add_argument("--encoder-lr", type=float, default=ENCODER_LR, help="the encoder's pretraining learning rate")
    ap.add_argument("--position", type=float, default=ENCODER_POSITION, help="the position objective's weight (0: off)")
    ap.add_argument(
        "--recolour", action="store_true", help="the encoder pretrained on recoloured images (pretrain_encoder)"
    )
    ap.add_argument("--per-token", action="store_true", help="one probe over single patch tokens (see above)")
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.time()
    world = World(WorldConfig(image_size=args.world_resolution), progress=False)
    checkpoint = pretrain_encoder(
        args.encoder,
        world,
        steps=args.encoder_steps,
        dense=args.dense,
        lr=args.encoder_lr,
        position=args.position,
        recolour=args.recolour,
    )
    enc = build_encoder(args.encoder, checkpoint=str(checkpoint), layer=args.layer)
    if args.per_token:
        out = per_token_probe(world, enc, args.train // 2, args.test, args.steps)
        print(
            json.dumps(
                {
                    "encoder": args.encoder,
                    "checkpoint": checkpoint.name,
                    "layer": args.layer,
                    "per_token_probe_accuracy": {k: round(v, 3) for k, v in out.items()},
                    "seconds": round(time.time() - started),
                }
            )
        )
        return
    x_train, y_train = features_and_labels(world, enc, "train", args.train)
    x_test, y_test = features_and_labels(world, enc, "test", args.test)
    x_comp, y_comp = features_and_labels(world, enc, "compositional", args.test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test, x_comp = (x_train - mean) / std, (x_test - mean) / std, (x_comp - mean) / std
    out: dict[str, float] = {}
    unseen: dict[str, float] = {}  # the compositional split's objects of a held-out colour-shape pair
    for k in ("colour", "shape", "size"):
        classes = int(y_train[k].max()) + 1
        w = torch.zeros(x_train.shape[1], 9 * classes, requires_grad=True)
        opt = torch.optim.Adam([w], lr=1e-3)
        for _ in range(args.steps):
            logits = (x_train @ w).view(-1, classes)
            loss = torch.nn.functional.cross_entropy(logits, y_train[k].reshape(-1)) + 1e-4 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = (x_test @ w).view(-1, 9, classes).argmax(-1)
            pred_comp = (x_comp @ w).view(-1, 9, classes).argmax(-1)
        held = y_test[k] > 0
        out[k] = float((pred[held] == y_test[k][held]).float().mean())
        novel = y_comp["held_out"] > 0
        unseen[k] = float((pred_comp[novel] == y_comp[k][novel]).float().mean())
        if k == "shape":
            for i, size in enumerate(SIZES):
                cells = novel & (y_comp["size"] == i + 1)
                unseen[f"shape ({size} objects)"] = float((pred_comp[cells] == y_comp[k][cells]).float().mean())
        if k == "shape":
            for i, size in enumerate(SIZES):
                cells = held & (y_test["size"] == i + 1)
                out[f"shape ({size} objects)"] = float((pred[cells] == y_test[k][cells]).float().mean())
    print(
        json.dumps(
            {
                "encoder": args.encoder,
                "layer": args.layer,
                "recolour": args.recolour,
                "world_resolution": args.world_resolution,
                "probe_accuracy": {k: round(v, 3) for k, v in out.items()},
                "probe_accuracy_unseen_pairs": {k: round(v, 3) for k, v in unseen.items()},
                "seconds": round(time.time() - started),
            }
        )
    )


if __name__ == "__main__":
    main()
