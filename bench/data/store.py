"""The on-disk rows of one encoder's features.

A directory holds:

- ``meta.json``: the row layout (arrays, shapes, dtype: the encoder's own dtype, so bf16 halves the bytes of fp32);
- ``<writer>-<k>.<array>.npy``: shards of ``rows_per_shard`` rows, sparse on disk until written, each written by one
  process only (``<writer>`` = host, pid and a random tag), filled as batches first need their images;
- ``<writer>.idx``: that writer's index, one line ``<image key> <shard> <row>`` appended only after the row's bytes
  are flushed. A row is valid iff its line is complete, so a writer killed at any moment never leaves a row that
  looks valid. The image key is a hash of the image's identity (:mod:`bench.data.images`), never its position in a list.

Readers (data-loader workers, other processes) read every ``*.idx`` and re-read new lines when a key is missing.
Two processes that encode the same image both write a valid row; either may be served.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path

import numpy as np
import torch

from connector_zoo.io import atomic_path

# numpy has no bfloat16: its rows are stored as the same 16 bits in uint16 and viewed back as torch.bfloat16
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class FeatureStore:
    """The on-disk rows of one encoder (see the module docstring)."""

    def __init__(self, directory: Path, layout: dict[str, tuple[int, ...]], dtype: str, rows_per_shard: int = 0):
        self.dir, self.layout, self.dtype = Path(directory), layout, dtype
        self.np_dtype = STORAGE[dtype]
        row_bytes = sum(int(np.prod(s)) for s in layout.values()) * np.dtype(self.np_dtype).itemsize
        # about 1 GiB per shard file set, at most 4,096 rows
        meta = {
            "layout": {k: list(v) for k, v in layout.items()},
            "dtype": dtype,
            "rows_per_shard": rows_per_shard or max(1, min(4096, 2**30 // row_bytes)),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            found = json.loads(meta_path.read_text())
            if {k: found[k] for k in ("layout", "dtype")} != {k: meta[k] for k in ("layout", "dtype")}:
                raise ValueError(f"{self.dir} holds features of another layout ({found}); remove the directory")
            meta = found
        else:
            with atomic_path(meta_path) as tmp:  # concurrent writers write identical bytes
                tmp.write_text(json.dumps(meta, sort_keys=True))
        self.rows_per_shard = meta["rows_per_shard"]
        self.index: dict[str, tuple[str, int, int]] = {}
        self._offsets: dict[str, int] = {}
        self._maps: dict[tuple[str, int, str], np.ndarray] = {}
        self.writer: str | None = None
        self._next = (0, 0)  # (shard, row) of this writer's next row
        self.refresh()

    # ------------------------------------------------------------------ read
    def refresh(self) -> None:
        """Read index lines written since the last call (complete lines only)."""
        for path in self.dir.glob("*.idx"):
            start = self._offsets.get(path.name, 0)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            end = data.rfind(b"\n") + 1
            writer = path.name[: -len(".idx")]
            for line in data[:end].decode().splitlines():
                parts = line.split(" ")
                if len(parts) == 3 and len(parts[0]) == 32:
                    self.index.setdefault(parts[0], (writer, int(parts[1]), int(parts[2])))
            self._offsets[path.name] = start + end

    def _map(self, writer: str, shard: int, name: str, mode: str = "r") -> np.ndarray:
        key = (writer, shard, name)
        if key not in self._maps:
            path = self.dir / f"{writer}-{shard}.{name}.npy"
            if mode == "w+":
                shape = (self.rows_per_shard, *self.layout[name])
                self._maps[key] = np.lib.format.open_memmap(path, mode="w+", dtype=self.np_dtype, shape=shape)
            else:
                self._maps[key] = np.load(path, mmap_mode="r")
        return self._maps[key]

    def read(self, keys: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """The stored rows among ``keys``: key -> {array name -> row}."""
        if any(k not in self.index for k in keys):
            self.refresh()
        out = {}
        for k in keys:
            if k in self.index:
                writer, shard, row = self.index[k]
                out[k] = {name: self._map(writer, shard, name)[row] for name in self.layout}
        return out

    def tensor(self, rows: list[np.ndarray]) -> torch.Tensor:
        """Stored rows as one torch tensor in the store's dtype."""
        stacked = torch.from_numpy(np.stack(rows))
        return stacked.view(torch.bfloat16) if self.dtype == "bfloat16" else stacked

    # ----------------------------------------------------------------- write
    def write(self, keys: list[str], arrays: dict[str, torch.Tensor]) -> None:
        """Append rows (torch tensors in the store's dtype), then their index lines."""
        if self.writer is None:
            self.writer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        arrays = {name: t.detach().cpu() for name, t in arrays.items()}  # one device-to-host copy per array
        lines = []
        for i, key in enumerate(keys):
            shard, row = self._next
            for name in self.layout:
                value = arrays[name][i].contiguous()
                if self.dtype == "bfloat16":
                    value = value.view(torch.uint16)
                self._map(self.writer, shard, name, mode="w+")[row] = value.numpy()
            lines.append(f"{key} {shard} {row}\n")
            self.index[key] = (self.writer, shard, row)
            self._next = (shard + 1, 0) if row + 1 == self.rows_per_shard else (shard, row + 1)
        for (writer, _, _), array in self._maps.items():
            if writer == self.writer:
                array.flush()
        # one append of whole lines, after the data: a kill leaves at most a torn last line, which is ignored
        fd = os.open(self.dir / f"{self.writer}.idx", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(lines).encode())
        finally:
            os.close(fd)

    def disk_bytes(self) -> int:
        """Bytes the shards occupy on disk (allocated blocks: unwritten rows of a shard take none)."""
        return sum(p.stat().st_blocks * 512 for p in self.dir.glob("*.npy"))
