"""Progress in a file or a pipe (issue 37, item 4): whole lines, not tqdm's carriage-return frames, so a cluster
job's log, ``nohup`` output or CI log stays readable; on a terminal tqdm's bar as before."""

from __future__ import annotations

import io
import os

import pytest
from conftest import MICRO, bench

from connector_zoo import io as zio


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_every_interval_and_one_at_the_end(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(zio.time, "monotonic", clock)
    buf = io.StringIO()
    bar = zio.progress(total=10, desc="stage 1", unit="step", file=buf, interval=30, disable=False)
    for step in range(10):  # as the trainer does: the step's loss, then the count
        clock.now += 7  # 7 s a step: a line after steps 5 and 10 (35 s, then 35 s more); the close adds none
        bar.set_postfix_str(f"loss {step}")
        bar.update(1)
    bar.close()
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert [line.split("|")[2].split()[0] for line in lines] == ["5/10", "10/10"]
    assert lines[-1].startswith("stage 1: 100%") and lines[-1].endswith("loss 9]")
    short = io.StringIO()
    with zio.progress(total=3, desc="answering", file=short, interval=30, disable=False) as quick:
        quick.update(3)  # shorter than the interval: only the final line
    assert short.getvalue().count("\n") == 1 and "3/3" in short.getvalue()


def test_a_terminal_gets_tqdm(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    from tqdm import tqdm

    assert isinstance(zio.progress(range(3), file=Tty(), disable=False), tqdm)
    assert isinstance(zio.progress(range(3), file=io.StringIO(), disable=False), zio.PlainProgress)


@pytest.mark.slow
def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["CONNECTOR_ZOO_PROGRESS_INTERVAL"] = "0"  # a line at every step: the test sees every kind of bar
    proc = bench([*MICRO, "--out", str(tmp_path / "run")], env={**env, "TQDM_DISABLE": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert any(line.startswith("stage 1: 100%") for line in proc.stderr.splitlines()), proc.stderr[-2000:]
