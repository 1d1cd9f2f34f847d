"""What ``pip install -e .`` leaves out (the ``report`` and ``hf`` extras) is needed by no part of the main job, and a
command that needs it says what to install in one line."""

from __future__ import annotations

import sys
import textwrap

import pytest
from conftest import MICRO, bench
from test_sweep import fake_run

from bench.cli import main

BLOCKER = textwrap.dedent(
    """
    import sys

    class Block:  # the optional packages, as if not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("matplotlib", "datasets"):
                raise ImportError(f"{name} is not installed")
            return None

    sys.meta_path.insert(0, Block())
    """
)


@pytest.mark.slow
def test_the_main_job_runs_without_the_optional_packages(tmp_path):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    from conftest import ROOT

    env = {"PYTHONPATH": f"{tmp_path / 'block'}:{ROOT}"}
    probe = bench(["list"], env=env)
    assert probe.returncode == 0
    proc = bench([*MICRO, "--out", str(tmp_path / "run")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists() and (tmp_path / "run" / "hf" / "config.json").exists()


def test_report_writes_the_tables_without_matplotlib_and_says_what_the_plots_need(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, find_spec says not installed
    fake_run(tmp_path / "runs", "linear", 0, 0.40, 0.2, 0.3, 16)
    fake_run(tmp_path / "runs", "mlp2x_gelu", 0, 0.50, 0.9, 0.3, 64)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "plots skipped (plots need matplotlib: pip install 'connector-zoo[report]')" in out
    assert (tmp_path / "report" / "table.md").exists() and not list((tmp_path / "report").glob("*.png"))
    # the HTML page is figures: refused in one line, before any table is written
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r2"), "--html", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "--html: the page's plots need matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r2").exists() and not (tmp_path / "h").exists()


def test_hf_data_without_datasets_is_one_line(tmp_path, monkeypatch):
    from bench.data.formats import hf_messages

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"--data hf reads Hugging Face datasets: pip install 'connector-zoo\[hf\]'"):
        hf_messages(tmp_path)
