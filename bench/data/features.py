"""Frozen-encoder features: computed online each batch, or kept in a lazily filled cache.

A frozen encoder's features are a pure function of (encoder family, weights, selected layer, preprocessing, dtype,
image), so they can be computed once per image and reused across epochs, runs and connectors. The cache of one
encoder lives in ``<cache>/features/<encoder.cache_key()><request.key()>/`` (``+attn``, ``+layers=11,15,21,22``,
...) as a :class:`~bench.data.store.FeatureStore` (shards
filled as batches first need them, rows keyed by image identity, crash-safe). ``forwards`` counts the images this
process encoded (0 on a warm cache).

With AnyRes tiling (an :class:`~encoders.anyres.AnyResGeometry`) an image is several views, each a row of its own,
keyed by the image's identity *and* what cuts the view out of it (the pinpoints, the tile size, the view's index:
``AnyResGeometry.tag``): the same image tiled under other pinpoints never reads these rows, and its untiled row
(keyed by the identity alone) is another row again. Which views an image has follows from its size, read from the
header (no pixel decoded), so a warm cache decodes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.data.images import BadSample, ImageTable
from bench.data.store import STORAGE, FeatureStore
from connector_zoo.io import cache_dir
from encoders.anyres import AnyResGeometry
from encoders.base import FeatureRequest, VisionEncoder, VisionFeatures

MODES = ("auto", "on", "off")


def image_key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


#: a stored row's name for each field of VisionFeatures (``attn``: the name caches had before layers and keys)
ROW_NAMES = {
    "patches": "patches",
    "cls": "cls",
    "cls_attention": "attn",
    "layers": "layers",
    "keys": "keys",
    "cls_qk": "cls_qk",
}


def row_layout(encoder: VisionEncoder, request: bool | FeatureRequest) -> dict[str, tuple[int, ...]]:
    """The stored rows of one image: the selected layer's patches, its CLS token, and what ``request`` adds."""
    info = encoder.info
    layout = {"patches": (info.num_patches, info.hidden_size)}
    if info.has_cls:
        layout["cls"] = (info.hidden_size,)
    extra = encoder.request_layout(FeatureRequest.of(request))
    layout.update({ROW_NAMES[name]: shape for name, shape in extra.items()})
    return layout


def bytes_per_image(encoder: VisionEncoder, request: bool | FeatureRequest) -> int:
    itemsize = np.dtype(STORAGE[encoder.dtype_name]).itemsize
    return sum(int(np.prod(shape)) for shape in row_layout(encoder, request).values()) * itemsize


@dataclass
class Partial:
    """What a data-loader worker hands over for a list of images: per position the keys of the image's rows (one,
    or one per view when tiled; None when unreadable, with the reason in ``bad``) and its (height, width) when tiled,
    the stored rows (``stored[name]``, one per key of ``stored_keys``) and the decoded, preprocessed pixels of the
    rows not stored (one per key of ``loaded``)."""

    keys: list[list[str] | None]
    bad: dict[int, str]
    stored_keys: list[str]
    stored: dict[str, torch.Tensor]
    loaded: list[str]
    pixels: torch.Tensor | None
    sizes: list[tuple[int, int] | None] | None = None

    def pin_memory(self) -> Partial:
        def pin(t):
            return t if t is None else t.pin_memory()

        return dataclasses.replace(self, stored={k: pin(v) for k, v in self.stored.items()}, pixels=pin(self.pixels))


@dataclass
class Fetched:
    """Features of a list of images: a row per readable image (per view of it when tiled), in order, and the
    unreadable ones by position; when tiled, each readable image's (height, width)."""

    features: VisionFeatures | None
    bad: dict[int, str]
    image_sizes: list[tuple[int, int]] | None = None

    def by_sample(self, has_image: list[bool]) -> dict[int, str]:
        """The reasons by position among samples, of which those with ``has_image`` were the images asked for."""
        with_image = [j for j, h in enumerate(has_image) if h]
        return {with_image[pos]: reason for pos, reason in self.bad.items()}


class FeatureCache:
    """Features of an :class:`ImageTable` for one encoder: from the store when ``cached``, else encoded online.

    ``gather`` is the worker-safe half (identities, stored rows, decoded and preprocessed images; no encoder
    forward); ``complete`` the main-process half (the forward on the images not stored, their rows written).
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        images: ImageTable,
        with_attention: bool | FeatureRequest,
        root: Path | None = None,
        cached: bool = True,
        batch_size: int = 64,
        store: FeatureStore | None = None,
        tiling: AnyResGeometry | None = None,
    ):
        """``with_attention``: the connector's :class:`FeatureRequest` (True: the CLS attention alone). ``store``:
        the open store of this directory to share (the image tables of one run use one store, so its index is read
        once and one writer fills it); opened here when not given. ``tiling``: AnyRes views instead of the image."""
        if tiling is not None and tiling.tile != encoder.info.image_size:
            raise ValueError(f"AnyRes tiles of {tiling.tile} px cannot feed a {encoder.info.image_size}-px encoder")
        self.encoder, self.images, self.tiling = encoder, images, tiling
        self.request = FeatureRequest.of(with_attention)
        self.batch_size = batch_size
        self.dir = (root or cache_dir() / "features") / (encoder.cache_key() + self.request.key(encoder))
        self.layout = row_layout(encoder, self.request)
        if cached and store is None:
            store = FeatureStore(self.dir, self.layout, encoder.dtype_name)
        if store is not None and store.dir != self.dir:
            raise ValueError(f"the store of {store.dir} cannot serve the features of {self.dir}")
        self.store = store if cached else None
        self.forwards = 0
        self.bad: dict[int, str] = {}

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.encoder.dtype_name)

    # ---------------------------------------------------------- worker side
    def row_keys(self, index: int) -> tuple[list[str], tuple[int, int] | None]:
        """The keys of an image's rows (one; one per view when tiled) and its (height, width) when tiled."""
        identity = self.images.identity(index)
        if self.tiling is None:
            return [image_key(identity)], None
        height, width = self.images.size(index)
        views = self.tiling.num_views(height, width)
        return [image_key(identity + self.tiling.tag(v)) for v in range(views)], (height, width)

    def gather(self, indices: list[int]) -> Partial:
        keys: list[list[str] | None] = []
        sizes: list[tuple[int, int] | None] = []
        bad: dict[int, str] = {}
        for pos, i in enumerate(indices):
            try:
                own, size = self.row_keys(i)
            except BadSample as err:
                own, size, bad[pos] = None, None, str(err)
            keys.append(own)
            sizes.append(size)
        wanted = list(dict.fromkeys(k for own in keys if own for k in own))
        rows = self.store.read(wanted) if self.store is not None else {}
        first: dict[tuple[str, ...], int] = {}  # each image with a row not stored, decoded once however often it occurs
        for pos, own in enumerate(keys):
            if own is not None and any(k not in rows for k in own):
                first.setdefault(tuple(own), pos)
        pil, loaded = [], []
        # a tiled image is decoded whole: a JPEG decoded at a reduced scale (draft) would change its size, and with it
        # the pinpoint its views (named from its header) were cut for
        size_hint = None if self.tiling is not None else self.encoder.info.image_size

        def drop(own: tuple[str, ...], reason: str) -> None:  # every position of this image is unreadable
            for p, other in enumerate(keys):
                if other is not None and tuple(other) == own:
                    keys[p], sizes[p], bad[p] = None, None, reason

        for own, pos in first.items():
            try:
                image = self.images.load(indices[pos], size_hint)
            except BadSample as err:
                drop(own, str(err))
                continue
            views = self.tiling.views(image) if self.tiling is not None else [image]
            if len(views) != len(own):  # a header that does not describe the pixels
                drop(own, f"image {self.images.names[indices[pos]]!r}: its header's size is not its pixels' size")
                continue
            for k, view in zip(own, views):
                if k not in rows and k not in loaded:
                    pil.append(view)
                    loaded.append(k)
        stored_keys = list(rows)
        stored = {name: self.store.tensor([rows[k][name] for k in stored_keys]) for name in self.layout} if rows else {}
        pixels = self.encoder.preprocess(pil) if pil else None
        return Partial(keys, bad, stored_keys, stored, loaded, pixels, sizes if self.tiling is not None else None)

    # ------------------------------------------------------------ main side
    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> VisionFeatures:
        """The encoder forward, in chunks of ``batch_size``, in the storage dtype (a half-precision tower already
        returns it; the cast guards any output that autocast leaves in fp32), so online and cached agree."""
        device = next(self.encoder.parameters()).device
        parts = []
        for start in range(0, len(pixel_values), self.batch_size):
            chunk = pixel_values[start : start + self.batch_size].to(device, non_blocking=True)
            parts.append(self.encoder(chunk, with_cls_attention=self.request).to(dtype=self.dtype))
        self.forwards += len(pixel_values)
        return VisionFeatures.stack(parts)

    def complete(self, part: Partial) -> Fetched:
        """Features for the readable positions, in order: stored rows, and the loaded images encoded now (and
        stored, unless this process stored them since the worker looked: a shared image, a prefetched batch)."""
        rows: dict[str, dict[str, torch.Tensor]] = {
            k: {name: v[j] for name, v in part.stored.items()} for j, k in enumerate(part.stored_keys)
        }
        todo = list(range(len(part.loaded)))
        if self.store is not None and part.loaded:
            have = self.store.read(part.loaded)
            for k, row in have.items():
                rows[k] = {name: self.store.tensor([row[name]])[0] for name in self.layout}
            todo = [j for j, k in enumerate(part.loaded) if k not in rows]
        if todo:
            pixels = part.pixels if len(todo) == len(part.loaded) else part.pixels[todo]
            feats = self.encode(pixels)
            arrays = {row: getattr(feats, name) for name, row in ROW_NAMES.items() if row in self.layout}
            new = [part.loaded[j] for j in todo]
            if self.store is not None:
                self.store.write(new, arrays)
            for i, k in enumerate(new):
                rows[k] = {name: v[i] for name, v in arrays.items()}
        order = [k for own in part.keys if own is not None for k in own]
        features = None
        if order:
            device = next(self.encoder.parameters()).device  # stored rows join the fresh ones where they are

            def take(name):
                return (
                    torch.stack([rows[k][name].to(device, non_blocking=True) for k in order])
                    if name in self.layout
                    else None
                )

            features = VisionFeatures(
                grid=self.encoder.info.grid, **{name: take(row) for name, row in ROW_NAMES.items()}
            )
        sizes = None
        if part.sizes is not None:
            sizes = [size for own, size in zip(part.keys, part.sizes) if own is not None]
        return Fetched(features, part.bad, sizes)

    def fetch(self, indices: list[int]) -> Fetched:
        """All in this process: features of the readable images among ``indices`` and the reasons for the rest."""
        got = self.complete(self.gather(indices))
        for pos, reason in got.bad.items():
            self.bad[indices[pos]] = reason
        return got

    def get(self, indices: list[int]) -> VisionFeatures:
        """Features of ``indices``, all readable (else :class:`BadSample` naming the first unreadable one)."""
        got = self.fetch(indices)
        if got.bad:
            raise BadSample(next(iter(got.bad.values())))
        return got.features

    def ensure(self, indices: list[int]) -> None:
        """Store the features of ``indices`` now (a warm-up; a no-op when the cache is off)."""
        if self.store is None:
            return
        todo = sorted(set(indices))
        for start in range(0, len(todo), self.batch_size):
            self.fetch(todo[start : start + self.batch_size])


def free_disk_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def decide(
    mode: str,
    encoder: VisionEncoder,
    tables: list[ImageTable],
    with_attention: bool | FeatureRequest,
    max_gb: float | None,
    root: Path | None = None,
    views: int = 1,
) -> tuple[bool, str]:
    """(cache on?, why) for ``--feature-cache auto|on|off``: auto caches a frozen encoder when the projected size of
    every image's rows (``views`` each at most: AnyRes) fits ``max_gb`` (default: half the free disk where the cache
    lives)."""
    if mode not in MODES:
        raise ValueError(f"--feature-cache must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "auto":
        return mode == "on", f"--feature-cache {mode}"
    if not encoder.frozen:
        return False, "the encoder trains, so its features change every step"
    root = root or cache_dir() / "features"
    n = sum(len(t) for t in tables)
    per_image = bytes_per_image(encoder, with_attention) * views
    projected = n * per_image
    limit = max_gb * 1e9 if max_gb is not None else free_disk_bytes(root) / 2
    where = f"--feature-cache-max-gb {max_gb:g}" if max_gb is not None else f"half the free disk at {root}"
    fits = projected <= limit
    verdict = "fits" if fits else "exceeds"
    return fits, (
        f"{n:,} images x {per_image / 1e6:.3g} MB = {projected / 1e9:.3g} GB {verdict} {limit / 1e9:.3g} GB ({where})"
    )
