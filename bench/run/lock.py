"""One writer per run directory: ``bench run`` (and each sweep cell) holds an OS file lock (``filelock``: ``flock`` on
Unix) on ``<run>/.writer.lock`` while it writes, so a second ``bench run --resume`` of the same directory stops with
one line naming the holder instead of racing it for the checkpoints. The OS drops the lock when its process dies,
however it dies, so a lock left by a killed run is simply taken over. Under torchrun / accelerate launch only the
process of rank 0 takes it: the others write nothing the main process does not coordinate.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".writer.lock"
HOLDER_NAME = ".writer.json"


class RunInUse(OSError):
    """Another live process is writing this run directory."""


def holder(directory: Path) -> str:
    """Who holds ``directory``'s lock, as its holder file says (pid, host, start time)."""
    try:
        info = json.loads((Path(directory) / HOLDER_NAME).read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


@contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s writer lock (creating the directory); :class:`RunInUse` if a live process holds it."""
    from filelock import FileLock, Timeout

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunInUse(
            f"{directory} is being written by another process ({holder(directory)}); wait for it to finish or stop "
            "it (a lock left by a process that died is taken over)"
        ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (directory / HOLDER_NAME).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    )
    try:
        yield
    finally:
        (directory / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()
