"""What the mini world's frozen encoder makes readable: a linear probe per grid cell, per attribute.

    python benchmarks/world_probe.py [--encoder clip] [--layer -2] [--train 6000] [--test 1000] [--steps 300]

The world's pretrained encoder (built on first use, like ``bench run``) encodes ``--train`` training and ``--test``
test images; for each attribute (colour, shape, size) and each of the 9 grid cells, a linear classifier on all patch
features of the selected layer (standardised) predicts the attribute of the object in that cell (or "none"), trained
with Adam on the training images. Printed: test accuracy over the cells that hold an object, per attribute, and for
shape split by object size. A VLM cannot answer a question type above what its encoder makes readable; far below it,
the connector and the LLM are the limit (see the README's notes on the world's ceiling).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.data.world import COLOURS, SHAPES, SIZES, World, WorldConfig
from bench.train.pretrain import pretrain_encoder
from encoders import build_encoder


def features_and_labels(world: World, enc, split: str, n: int):
    n = min(n, len(world.records(split)))
    chunks = []
    for start in range(0, n, 256):
        px = enc.preprocess([world.image(split, j) for j in range(start, min(n, start + 256))])
        with torch.no_grad():
            chunks.append(enc(px).patches.flatten(1).float())
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}
    labels = {k: torch.zeros(n, 9, dtype=torch.long) for k in values}
    for j, record in enumerate(world.records(split)[:n]):
        for o in record["objects"]:
            for k, names in values.items():
                labels[k][j, o["cell"]] = names.index(o[k]) + 1  # 0 = no object in the cell
    return torch.cat(chunks), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="clip")
    ap.add_argument("--layer", type=int, default=-2)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--world-resolution", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.time()
    world = World(WorldConfig(image_size=args.world_resolution), progress=False)
    enc = build_encoder(args.encoder, checkpoint=str(pretrain_encoder(args.encoder, world)), layer=args.layer)
    x_train, y_train = features_and_labels(world, enc, "train", args.train)
    x_test, y_test = features_and_labels(world, enc, "test", args.test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out: dict[str, float] = {}
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
        held = y_test[k] > 0
        out[k] = float((pred[held] == y_test[k][held]).float().mean())
        if k == "shape":
            for i, size in enumerate(SIZES):
                cells = held & (y_test["size"] == i + 1)
                out[f"shape ({size} objects)"] = float((pred[cells] == y_test[k][cells]).float().mean())
    print(json.dumps({"encoder": args.encoder, "layer": args.layer, "world_resolution": args.world_resolution,
                      "probe_accuracy": {k: round(v, 3) for k, v in out.items()},
                      "seconds": round(time.time() - started)}))  # fmt: skip


if __name__ == "__main__":
    main()
