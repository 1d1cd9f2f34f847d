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


class BadSample(ValueError):
    """A sample that cannot be used, with its id and the reason."""


class ImageTable:
    """Base class: ``len``, ``identity(i)``, ``load(i)`` (RGB) and ``names[i]`` for messages; ``key`` describes the
    source in logs (it keys nothing)."""

    key: str = ""
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def identity(self, index: int) -> str:
        raise NotImplementedError

    def _open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        try:
            image = self._open(index)
            image.load()
            return image.convert("RGB")
        except BadSample:
            raise
        except Exception as err:  # missing, truncated or not an image at all
            raise BadSample(f"image {self.names[index]!r} cannot be read ({type(err).__name__}: {err})") from err


class FileImages(ImageTable):
    """Image files under one folder, by relative path (LLaVA JSON's ``image`` field)."""

    def __init__(self, folder: str | os.PathLike, paths: list[str]):
        self.folder = os.path.abspath(folder)
        self.names = list(paths)
        self.key = f"files:{self.folder}"

    def path(self, index: int) -> str:
        """The file's absolute path; a name that leads outside the folder (``..``, an absolute path) is refused.
        Symbolic links inside the folder are followed (LLaVA's ``coco/`` is often a link to shared storage)."""
        path = os.path.normpath(os.path.join(self.folder, self.names[index]))
        if not path.startswith(self.folder + os.sep):
            raise BadSample(f"image {self.names[index]!r} lies outside the image folder {self.folder}; refused")
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
