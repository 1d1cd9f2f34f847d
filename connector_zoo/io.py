"""Files: the cache directory, atomic writes, and directory checkpoints that are built once and reused."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where built presets, the mini world and feature caches live (``$CONNECTOR_ZOO_CACHE`` overrides)."""
    root = os.environ.get("CONNECTOR_ZOO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "connector_zoo"
    )
    return Path(root)


#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: whether this process called keep_freed_memory and glibc took it (a run logs it)
FREED_MEMORY_KEPT = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep what a process frees for its next allocations, instead of handing it back to the
    kernel (large blocks are their own mappings, unmapped when freed; the heap's top is trimmed): a training step
    allocates the same few GB of activations and gradients every step, and each page given back is faulted in and
    zeroed again by the kernel at the next step (``benchmarks/malloc_step.py`` counts the faults and times both).
    Opt-in (``CONNECTOR_ZOO_MALLOC=keep``): the heap then also holds every large transient, and cannot always reuse
    its holes, so the peak RSS grows (a CLIP-L/336 + Vicuna-7B-width stage-1 run of the test suite: 5.77 GB against
    3.61 GB); a narrow model trained for hundreds of steps (the pretrained world level) gains, a real-width run short
    of memory does not. True when it was asked for and glibc took both settings; False otherwise (not asked, or
    another C library), nothing changed."""
    import ctypes

    if os.environ.get("CONNECTOR_ZOO_MALLOC", "default") != "keep":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global FREED_MEMORY_KEPT
    FREED_MEMORY_KEPT = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return FREED_MEMORY_KEPT


def show_progress() -> bool:
    """Progress bars on stderr: off under ``bench ... --quiet`` (``CONNECTOR_ZOO_QUIET=1``) and with tqdm's own
    ``TQDM_DISABLE=1``, read when each bar starts."""
    off = ("1", "true", "True")
    return os.environ.get("CONNECTOR_ZOO_QUIET") not in off and os.environ.get("TQDM_DISABLE") not in off


#: seconds between two progress lines when the output is a file or a pipe (a cluster job's log, nohup, CI)
PLAIN_INTERVAL = float(os.environ.get("CONNECTOR_ZOO_PROGRESS_INTERVAL", "30"))


def progress(iterable: Any = None, **kwargs: Any):
    """tqdm's bar on a terminal; in a file or a pipe (a cluster job's log, nohup, CI), plain lines instead of
    carriage-return frames: one at most every ``PLAIN_INTERVAL`` seconds and one at the end, so the log stays readable
    with ``tail`` and ``grep``. Off under ``--quiet`` and ``TQDM_DISABLE=1`` (:func:`show_progress`) unless
    ``disable`` is given."""
    kwargs.setdefault("disable", not show_progress())
    stream = kwargs.get("file") or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


class PlainProgress:
    """The part of tqdm's interface the harness uses (iterate, ``update``, ``set_postfix_str``, ``close``), written
    as whole lines (tqdm's own meter text) at most every ``interval`` seconds and once when closed."""

    def __init__(
        self,
        iterable: Any = None,
        total: int | None = None,
        initial: int = 0,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        file: Any = None,
        interval: float | None = None,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = self.initial = initial
        self.desc, self.unit, self.disable = desc, unit, disable
        self.fp = file or sys.stderr
        self.interval = PLAIN_INTERVAL if interval is None else interval
        self.postfix: str | None = None
        self.start = self.printed = time.monotonic()
        self.closed = False
        self.last: tuple[int, str | None] | None = None  # (count, postfix) of the last line written

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.printed >= self.interval:
            self._print()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s or None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.initial and (self.n, self.postfix) != self.last:  # the final state, once
                self._print()

    def _print(self) -> None:
        from tqdm import tqdm

        self.printed = time.monotonic()
        if self.disable:
            return
        self.last = (self.n, self.postfix)
        line = tqdm.format_meter(
            self.n,
            self.total,
            self.printed - self.start,
            prefix=self.desc,
            unit=self.unit,
            postfix=self.postfix,
            initial=self.initial,
            ascii=True,
        )
        self.fp.write(line.strip() + "\n")
        self.fp.flush()


def kill_point(name: str) -> None:
    """Tests: die here like a killed job (SIGKILL, nothing cleaned up) when ``CONNECTOR_ZOO_KILL_AT`` names this
    point, e.g. ``pretrain-encoder-clip:3``, ``step:2:5`` (after step 5 of stage 2, its checkpoints written) or
    ``checkpoint-write:1:4`` (stage 1, step 4: weights written, not yet renamed into place)."""
    if os.environ.get("CONNECTOR_ZOO_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _temp_prefix(name: str) -> str:
    """Temporaries carry their writer (host and process id), so a later writer can tell a dead one's leftovers."""
    return f".tmp-{name}-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temporaries(parent: Path, name: str, max_age_other_host: float = 86400.0) -> list[Path]:
    """Remove ``.tmp-{name}-*`` siblings whose writer is dead: on this host, a process id that no longer runs; from
    another host (a shared file system), older than ``max_age_other_host`` seconds. Returns what was removed."""
    pattern = re.compile(rf"\.tmp-{re.escape(name)}-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
    host, removed = socket.gethostname(), []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None:
            continue
        if m["host"] == host:
            pid = int(m["pid"])
            if pid == os.getpid() or _alive(pid):
                continue
        else:
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < max_age_other_host:
                    continue
            except FileNotFoundError:
                continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_as_usual(path: str | os.PathLike) -> None:
    """``path`` and everything under it with the permissions a plain ``open``/``mkdir`` gives (0666/0777 less the
    umask): ``mkdtemp`` makes directories 0700 and safetensors writes files 0600, so a directory written through a
    temporary one could not be read by a colleague or served from a shared disk (hard links share one mode)."""
    mask = _umask()
    for p in [Path(path), *Path(path).rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def link_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Every file under ``source`` (:func:`files_of`: the ``.complete`` marker stays behind) hard-linked, or copied
    across file systems, at the same place under ``target``."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in files_of(source):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(source / name, target / name)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (files or directories).

    A crash leaves only a ``.tmp-*`` sibling, never a half-written file under the real name; the next write of the
    same path removes such leftovers of dead writers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent)) / path.name
    try:
        yield tmp
        if tmp.exists():
            readable_as_usual(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``target`` as a hard link to ``source`` (the bytes are not written twice), a copy where links fail (another
    file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` whole or is left as it was (written beside, renamed into place)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} does not exist") from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the file is corrupt or was not written by this tool"
        ) from err


MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, names: list[str]) -> None:
    """``manifest.json``: the SHA-256 and size of each named file of ``directory`` (written after them)."""
    directory = Path(directory)
    files = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names}
    write_json(directory / MANIFEST_NAME, {"files": files})


def verify_file(path: str | os.PathLike) -> None:
    """Check a file against its directory's manifest: a garbled or swapped file is refused, not loaded."""
    path = Path(path)
    fix = "pass --no-verify to load it anyway"
    try:
        entry = read_json(path.parent / MANIFEST_NAME)["files"][path.name]
        want, size = entry["sha256"], entry["bytes"]
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no {MANIFEST_NAME} beside it, so its integrity cannot be checked (written by an "
            f"older version, or copied without it); {fix}"
        ) from None
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path.parent / MANIFEST_NAME} has no valid entry for {path.name} ({err}); {fix}") from err
    if path.stat().st_size != size or sha256_file(path) != want:
        raise ValueError(
            f"{path} does not match its SHA-256 in {MANIFEST_NAME}: the file is corrupt or was changed "
            f"after it was written; {fix}"
        )


def files_of(directory: Path) -> list[str]:
    """The files under ``directory`` (relative posix paths, sorted), less the ``.complete`` marker."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != ".complete"
    )


def check_directory(directory: Path) -> None:
    """Every file of a built directory against its manifest; one line naming the first that differs. A directory
    built before manifests were written gets one now (its files are trusted once, and checked from then on)."""
    if not (directory / MANIFEST_NAME).exists():
        write_manifest(directory, files_of(directory))
        return
    for name, entry in read_json(directory / MANIFEST_NAME)["files"].items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ValueError(
                f"{path} is missing or damaged (it no longer matches {MANIFEST_NAME}): this cached "
                f"directory is refused; delete {directory} and it is built again"
            )


def materialize(directory: Path, build: Callable[[Path], None], verified: bool = False) -> Path:
    """Return ``directory``, calling ``build(tmp_dir)`` first if it does not exist yet (atomic: all or nothing).

    Several processes may build at once (two runs on an empty cache): the first complete one is renamed into place
    and the later ones discard their copy, so a reader never sees a finished directory replaced under it.
    ``verified``: every file's SHA-256 goes into a manifest when it is built and is checked each time it is returned
    (the world's backbones decide every later number: a damaged file is refused, never used)."""
    directory = Path(directory)
    if (directory / ".complete").exists():
        if verified:
            check_directory(directory)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory.parent, directory.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(directory.name), dir=directory.parent))
    try:
        build(tmp)
        if verified:
            write_manifest(tmp, files_of(tmp))
        (tmp / ".complete").write_text("ok\n")
        readable_as_usual(tmp)
        try:
            os.rename(tmp, directory)  # refused when another writer's complete directory is already there
        except OSError:
            if not (directory / ".complete").exists():  # an incomplete leftover of an older writer
                shutil.rmtree(directory, ignore_errors=True)
                os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
