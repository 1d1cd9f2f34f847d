"""One writer per run directory (bench/run/lock.py): a second ``bench run --resume`` of a directory a live process is
writing stops with one line naming the holder, and a lock left by a process killed with SIGKILL is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, bench

from bench.run.lock import RunInUse, writer_lock


def test_a_second_writer_gets_one_line_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with writer_lock(run):
        proc = bench(["run", "--resume", str(run)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"bench run: error: {run} is being written by another")
    assert f"pid {os.getpid()} on " in proc.stderr
    with writer_lock(run):  # released: the next writer takes it
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    code = (
        f"import time; from bench.run.lock import writer_lock\nwith writer_lock({str(run)!r}):\n"
        "    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUse, match=f"pid {holder.pid} on "), writer_lock(run):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's flock at once; allow for a slow reaper
        try:
            with writer_lock(run):
                break
        except RunInUse:
            assert time.time() < deadline, "the dead process's lock was never released"
            time.sleep(0.1)
