"""Image tables: the images of a dataset by index, each with an identity that names its content.

The identity is what the feature cache keys a row by, so it must change whenever the pixels can: a file is named by
its absolute path, size and modification time in nanoseconds (one ``stat``, whose cost does not grow with the file,
where a content hash reads every byte: ``benchmarks/data_path.py`` prints both), in-memory images and images
embedded in a Hugging Face dataset by a hash of their bytes. Never by a position in a list: two JSON files over one
folder, in any order, name a shared image identically.

Nothing here touches an image before it is needed: building a table of 665K paths reads no file, and a missing or
unreadable image surfaces as :class:`BadSample` when its batch is loaded (in a data-loader worker), with its name.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from connector_zoo.settings import PILLOW_MAX_IMAGE_PIXELS


class BadSample(ValueError):
    """A sample that cannot be used, with its id and the reason."""


DEFAULT_MAX_PIXELS = PILLOW_MAX_IMAGE_PIXELS  # unless a run sets another limit (``--max-image-pixels``)


class ImageTable:
    """Base class: ``len``, ``identity(i)``, ``load(i)`` (RGB) and ``names[i]`` for messages; ``key`` describes the
    source in logs (it keys nothing).

    ``max_pixels``: an image with more pixels is refused from its header, before any pixel is decoded (one huge image
    must not take gigabytes in every worker); None or 0: no limit. ``load(i, size)`` lets a JPEG decoder skip detail
    the encoder cannot use: when the image is at least twice the encoder's input side, it is decoded at a reduced
    scale (``draft``, DCT scaling by 1/2, 1/4 or 1/8) that still keeps every side at least ``size``."""

    key: str = ""
    names: list[str]
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.names)

    def identity(self, index: int) -> str:
        raise NotImplementedError

    def _open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of an image from its header, no pixel decoded (AnyRes needs it to name the views)."""
        try:
            with self._open(index) as image:
                width, height = image.size
        except Exception as err:  # missing, not an image, a decompression bomb
            raise BadSample(f"image {self.names[index]!r} cannot be read ({type(err).__name__}: {err})") from err
        return height, width

    def load(self, index: int, size: int | None = None) -> Image.Image:
        try:
            if Image.MAX_IMAGE_PIXELS and (not self.max_pixels or self.max_pixels > 2 * Image.MAX_IMAGE_PIXELS):
                Image.MAX_IMAGE_PIXELS = None  # a limit above Pillow's hard one (or none): ours replaces Pillow's
            try:
                image = self._open(index)
            except Image.DecompressionBombError as err:  # over twice Pillow's limit, so over ours too
                raise BadSample(
                    f"image {self.names[index]!r} is over the limit of {self.max_pixels / 1e6:.1f} MP "
                    f"({err}); skipped before decoding (raise --max-image-pixels to use it)"
                ) from err
            width, height = image.size
            if self.max_pixels and width * height > self.max_pixels:
                raise BadSample(
                    f"image {self.names[index]!r} is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit "
                    f"of {self.max_pixels / 1e6:.1f} MP; skipped before decoding (raise --max-image-pixels to use it)"
                )
            if size and image.format == "JPEG" and min(width, height) >= 2 * size:
                image.draft("RGB", (size, size))  # keeps both sides >= size: the resize to the encoder loses nothing
            image.load()
            return image.convert("RGB")
        except BadSample:
            raise
        except Exception as err:  # missing, truncated or not an image at all
            raise BadSample(f"image {self.names[index]!r} cannot be read ({type(err).__name__}: {err})") from err


class FileImages(ImageTable):
    """Image files under one folder, by relative path (LLaVA JSON's ``image`` field).

    A record names a file *inside* the folder: the path is resolved (``..`` and symbolic links followed) and must
    still lie in the resolved folder, so neither ``../../etc/passwd``, an absolute path, nor a link pointing out of
    the folder reads a file elsewhere. ``allow_outside`` (``--allow-paths-outside-image-folder``) lifts this, for a
    folder whose sub-folders are links to shared storage (LLaVA's ``coco/`` often is)."""

    def __init__(self, folder: str | os.PathLike, paths: list[str], allow_outside: bool = False):
        self.folder = os.path.realpath(folder)
        self.names = list(paths)
        self.allow_outside = allow_outside
        self.key = f"files:{self.folder}"

    def path(self, index: int) -> str:
        """The file's resolved absolute path; refused (:class:`BadSample`) when it leaves the folder."""
        path = os.path.realpath(os.path.join(self.folder, self.names[index]))
        if not self.allow_outside and not path.startswith(self.folder + os.sep):
            raise BadSample(
                f"image {self.names[index]!r} resolves to {path}, outside the image folder {self.folder}; refused "
                "(pass --allow-paths-outside-image-folder if the folder links to image storage on purpose)"
            )
        return path

    def identity(self, index: int) -> str:
        path = self.path(index)
        try:
            st = os.stat(path)
        except OSError as err:
            raise BadSample(f"image {self.names[index]!r} cannot be read ({type(err).__name__}: {err})") from err
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"

    def _open(self, index: int) -> Image.Image:
        return Image.open(self.path(index))


class ArrayImages(ImageTable):
    """Images held as one (N, H, W, 3) uint8 array (the mini world's, memory-mapped)."""

    def __init__(self, key: str, array: np.ndarray, names: list[str]):
        self.key, self.array, self.names = key, array, list(names)

    def identity(self, index: int) -> str:
        pixels = np.ascontiguousarray(self.array[index])
        return f"pixels:{pixels.shape}:{hashlib.sha256(pixels.tobytes()).hexdigest()}"

    def _open(self, index: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.array[index]))

    def size(self, index: int) -> tuple[int, int]:
        height, width = self.array.shape[1:3]
        return int(height), int(width)


class HFImages(ImageTable):
    """The first image of selected rows of a Hugging Face dataset, read from its Arrow column undecoded
    (``{"bytes", "path"}``) and only when asked, so listing the dataset decodes and copies nothing.

    ``rows`` and ``names`` are filled by the caller after construction (the lists are kept, not copied)."""

    def __init__(self, key: str, table: Any, column: str, rows: list[int], names: list[str]):
        self.key, self.table, self.column, self.rows, self.names = key, table, column, rows, names

    def _raw(self, index: int) -> dict[str, Any]:
        value = self.table.column(self.column)[self.rows[index]].as_py()
        value = value[0] if isinstance(value, list) and value else value
        if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
            raise BadSample(f"image of {self.names[index]!r} is neither bytes nor a path: {str(value)[:60]!r}")
        return value

    def identity(self, index: int) -> str:
        raw = self._raw(index)
        if raw.get("bytes"):
            return f"bytes:{hashlib.sha256(raw['bytes']).hexdigest()}"
        try:
            st = os.stat(raw["path"])
        except OSError as err:
            raise BadSample(f"image {raw['path']!r} of {self.names[index]!r} cannot be read ({err})") from err
        return f"file:{os.path.realpath(raw['path'])}:{st.st_size}:{st.st_mtime_ns}"

    def _open(self, index: int) -> Image.Image:
        raw = self._raw(index)
        return Image.open(io.BytesIO(raw["bytes"])) if raw.get("bytes") else Image.open(Path(raw["path"]))
