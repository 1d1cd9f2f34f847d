"""The frozen-encoder feature cache.

A frozen encoder's features are a pure function of (encoder family, weights, selected layer, preprocessing, image), so
they are computed once per image and reused across epochs, runs and connectors. The cache lives in
``<cache>/features/<encoder.cache_key()>/<source>[+attn]/`` as float32 ``.npy`` memory maps (bit-identical on reread)
plus a ``done`` flag per image, set only after the row is flushed, so a run killed mid-write never leaves a row that
looks valid. ``forwards`` counts the images this process encoded (0 on a warm cache).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.data import BadSample, ImageTable
from connector_zoo.io import cache_dir, materialize
from encoders.base import VisionEncoder, VisionFeatures


class FeatureCache:
    def __init__(self, encoder: VisionEncoder, images: ImageTable, with_attention: bool, root: Path | None = None,
                 batch_size: int = 128, progress: bool = True):  # fmt: skip
        self.encoder, self.images, self.with_attention = encoder, images, with_attention
        self.batch_size, self.progress = batch_size, progress
        source = hashlib.sha256(images.key.encode()).hexdigest()[:16]
        self.dir = (
            (root or cache_dir() / "features") / encoder.cache_key() / (source + ("+attn" if with_attention else ""))
        )
        self.forwards = 0
        self.bad: dict[int, str] = {}
        self._arrays: dict[str, np.ndarray] | None = None

    # ---------------------------------------------------------------- storage
    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            info = self.encoder.info
            n, p, d = len(self.images), info.num_patches, info.hidden_size
            shapes = {"patches": (n, p, d), "done": (n,)}
            if info.has_cls:
                shapes["cls"] = (n, d)
            if self.with_attention:
                shapes["attn"] = (n, info.num_heads, p)

            def build(tmp: Path) -> None:
                (tmp / "source.json").write_text(json.dumps({"images": self.images.key, "n": n}))
                for name, shape in shapes.items():
                    dtype = np.bool_ if name == "done" else np.float32
                    np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()

            materialize(self.dir, build)
            self._arrays = {name: np.load(self.dir / f"{name}.npy", mmap_mode="r+") for name in shapes}
        return self._arrays

    # ---------------------------------------------------------------- access
    def ensure(self, indices: list[int]) -> None:
        """Encode the images among ``indices`` that are not cached yet (unreadable ones go to ``self.bad``)."""
        arrays = self._open()
        todo = sorted({i for i in indices if not arrays["done"][i] and i not in self.bad})
        bar = tqdm(total=len(todo), desc=f"encoding images ({self.encoder.registered_name})",
                   disable=not self.progress or len(todo) < self.batch_size, leave=False)  # fmt: skip
        for start in range(0, len(todo), self.batch_size):
            chunk, pil = [], []
            for i in todo[start : start + self.batch_size]:
                try:
                    pil.append(self.images.load(i))
                    chunk.append(i)
                except BadSample as err:
                    self.bad[i] = str(err)
            if chunk:
                self._write(chunk, pil)
            bar.update(len(todo[start : start + self.batch_size]))
        bar.close()

    @torch.no_grad()
    def _write(self, chunk: list[int], pil) -> None:
        arrays = self._open()
        device = next(self.encoder.parameters()).device
        feats = self.encoder(self.encoder.preprocess(pil).to(device), with_cls_attention=self.with_attention)
        self.forwards += len(chunk)
        arrays["patches"][chunk] = feats.patches.float().cpu().numpy()
        if "cls" in arrays:
            arrays["cls"][chunk] = feats.cls.float().cpu().numpy()
        if "attn" in arrays:
            arrays["attn"][chunk] = feats.cls_attention.float().cpu().numpy()
        for name in ("patches", "cls", "attn"):
            if name in arrays:
                arrays[name].flush()
        arrays["done"][chunk] = True  # only after the data is on disk
        arrays["done"].flush()

    def get(self, indices: list[int]) -> VisionFeatures:
        self.ensure(indices)
        bad = [i for i in indices if i in self.bad]
        if bad:
            raise BadSample(self.bad[bad[0]])
        arrays = self._open()
        take = lambda name: torch.from_numpy(np.ascontiguousarray(arrays[name][indices])) if name in arrays else None  # noqa: E731
        return VisionFeatures(take("patches"), take("cls"), self.encoder.info.grid, take("attn"))
