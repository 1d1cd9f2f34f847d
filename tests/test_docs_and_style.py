"""The README's example connector runs as written, the CLI reports bad input cleanly, the code is ruff clean."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "bench.cli"]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example: my_connector.py -->\n```python\n(.*?)```\n<!-- end example -->", text, re.S)
    assert block, "README.md lost its example connector"
    return block.group(1)


def run_bench(args: list[str], cwd: Path, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p))
    return subprocess.run([*BENCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_example_connector_runs_through_bench(tmp_path):
    (tmp_path / "my_connector.py").write_text(readme_example())
    # the README's command: PYTHONPATH=. bench tokens --connector my_connector:AvgPool2x --connector-arg stride=4
    out = run_bench(["tokens", "--connector", "my_connector:AvgPool2x", "--connector-arg", "stride=4"], tmp_path, ".")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("my_connector:AvgPool2x"))
    assert row.split()[1] == "4.0"  # 8x8 grid pooled by 4 -> 2x2 tokens per image


def test_bench_list_shows_three_families():
    out = run_bench(["list"], ROOT)
    assert out.returncode == 0, out.stderr
    for name in ("clip", "siglip", "eva-vit-g", "linear", "mlp2x_gelu", "qwen3", "tinyllama", "vicuna"):
        assert re.search(rf"^  {re.escape(name)}\s+built-in\s+\S", out.stdout, re.M), name


@pytest.mark.parametrize(
    "args,message",
    [
        (["tokens", "--connector", "qfromer"], "unknown connector 'qfromer'"),
        (["tokens", "--encoder", "clipp"], "did you mean 'clip'"),
        (["tokens", "--llm-checkpoint", "/no/such/dir"], "could not load vicuna config"),
        (["tokens", "--connector-arg", "depth"], "must look like key=value"),
    ],
)
def test_bad_input_gives_one_clear_line(args, message):
    out = run_bench(args, ROOT)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_ruff_clean():
    # ruff comes with the dev extra, next to this interpreter
    ruff = str(Path(sys.executable).parent / "ruff") if (Path(sys.executable).parent / "ruff").exists() else "ruff"
    for args in (["check"], ["format", "--check"]):  # ruff's own report is the failure message
        proc = subprocess.run([ruff, *args, str(ROOT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_source_file_is_ignored_by_git():
    """A .gitignore pattern that matches a source directory (``report/`` matched bench/report/) leaves its new files
    out of every commit and out of ruff's view (ruff follows .gitignore): the module works here and is missing from a
    clone. Every Python file of the tree is tracked or trackable."""
    listed = []
    for which in ("--cached", "--others"):  # tracked files a pattern matches (ruff skips them), and new ones
        cmd = ["git", "ls-files", which, "--ignored", "--exclude-standard", "--", "*.py"]
        listed += subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    skipped = (".venv/", "build/", "dist/")  # environments and build outputs: not the project's sources
    ignored = [f for f in listed if not f.startswith(skipped) and "/." not in f"/{f}"]
    assert not ignored, f"git ignores these source files (see .gitignore): {ignored[:10]}"


BENCH_STAGES = ["data", "train", "evaluate", "run", "report", "cli"]  # their import order: tests/test_layout.py


def test_bench_is_arranged_by_stage_and_each_stage_says_what_lives_there():
    """bench/ by stage (docs/layout.md); each package's __init__ says what lives there."""
    bench_dir = ROOT / "bench"
    assert sorted(p.name for p in bench_dir.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(BENCH_STAGES)
    for pkg in BENCH_STAGES:
        init = (bench_dir / pkg / "__init__.py").read_text()
        assert init.lstrip().startswith('"""') and len(init) > 60, f"bench/{pkg}/__init__.py needs a docstring"


def test_bench_tokens_prints_only_its_table_on_a_cold_cache(tmp_path):
    """Building the tiny presets writes model shards; transformers' progress bars must not reach the terminal."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env.update(CONNECTOR_ZOO_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [*BENCH, "tokens", "--encoder-checkpoint", "tiny-24", "--connector", "mlp2x_gelu,qformer"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("encoder clip") and lines[1].startswith("connector")
