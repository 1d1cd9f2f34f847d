"""The import contract (docs/layout.md, pyproject.toml's [tool.importlinter]): the harness on top of the composed
model, the model on the components, the components on the plumbing; no cycle among the project's modules; the
library never imports ``bench``, function-local imports included. ``bench list`` starts without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (tomli comes with import-linter there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "connector_zoo", "connectors", "encoders", "llms")
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def build_graph():
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def broken_contracts(graph) -> list[str]:
    """Each contract of pyproject.toml checked on ``graph``: the layers (a lower layer importing a higher one,
    directly or through a chain) and the forbidden imports."""
    problems = []
    for contract in CONFIG["contracts"]:
        if contract["type"] == "layers":
            layers = [set(layer.split(" | ")) for layer in contract["layers"]]
            for dep in graph.find_illegal_dependencies_for_layers(layers=layers):
                problems.append(f"{contract['name']}: {dep.importer} imports {dep.imported}")
        elif contract["type"] == "forbidden":
            for source in contract["source_modules"]:
                for forbidden in contract["forbidden_modules"]:
                    if graph.chain_exists(importer=source, imported=forbidden, as_packages=True):
                        chain = graph.find_shortest_chain(importer=source, imported=forbidden, as_packages=True)
                        problems.append(f"{contract['name']}: {' -> '.join(chain)}")
    return problems


def test_the_project_keeps_its_import_contract():
    graph = build_graph()
    assert broken_contracts(graph) == []
    assert cycles(graph) == []


def test_the_check_catches_an_upward_import_and_a_cycle():
    """The same checks on the graph with one import added, as a function-local ``from bench... import`` in a connector
    would add it: the contract fails, and so does the acyclicity when the harness already imports that connector."""
    graph = build_graph()
    graph.add_import(importer="connectors.linear", imported="bench.run.job", line_number=1, line_contents="x")
    problems = broken_contracts(graph)
    assert any("never imports the harness" in p and "connectors.linear" in p for p in problems)
    assert any("composed model" in p for p in problems)
    graph.add_import(
        importer="connector_zoo.model.vlm", imported="connector_zoo.model.modeling", line_number=1, line_contents="x"
    )
    assert ["connector_zoo.model.modeling", "connector_zoo.model.vlm"] in cycles(graph)


def test_function_local_imports_are_in_the_graph(tmp_path):
    """grimp reads imports inside functions too, so a lazy upward import cannot hide from the contract."""
    pkg = tmp_path / "lazy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from lazy_pkg import high\n    return high\n")
    (pkg / "high.py").write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        lazy = grimp.build_graph("lazy_pkg", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert lazy.direct_import_exists(importer="lazy_pkg.low", imported="lazy_pkg.high")


def test_lint_imports_agrees():
    """import-linter itself (``lint-imports``, what a contributor runs) reads the same contracts and keeps them."""
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run(
        [str(exe) if exe.exists() else "lint-imports", "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"Contracts: {len(CONFIG['contracts'])} kept, 0 broken" in proc.stdout


def heavy_modules_after(probe: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``probe`` in a fresh process and check that it loaded neither torch, transformers nor the composed model."""
    probe += (
        "\nprint('LOADED', *sorted(m for m in ('torch', 'transformers', 'connector_zoo.model') if m in sys.modules))"
    )
    env = {"PYTHONPATH": str(ROOT), "CONNECTOR_ZOO_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED"
    return proc


def test_bench_list_starts_without_torch(tmp_path):
    """``bench list`` imports neither torch, transformers nor the composed model (``bench tokens`` builds a VLM and
    needs them all)."""
    probe = (
        "import runpy, sys; sys.argv = ['bench', 'list']\n"
        "try:\n    runpy.run_module('bench.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    )
    proc = heavy_modules_after(probe, tmp_path)
    assert "  mlp2x_gelu" in proc.stdout


def test_a_runs_settings_are_data_checked_without_torch(tmp_path):
    """``bench.train.settings`` (what a run is) imports neither torch, transformers nor the model, and checks a
    configuration file's values there: the assembly (``bench.train.assemble``) is a separate module."""
    probe = (
        "import sys\n"
        "from bench.train.settings import RunConfig\n"
        "from bench.cli.config_file import parse_with_config\n"
        "cfg = RunConfig(connector={'name': 'cls_prune', 'keep_ratio': 0.5}, seed=3)\n"
        "try:\n    RunConfig(seed=-1)\nexcept ValueError as err:\n    print('REFUSED', err)\n"
        "print(cfg.resolved_stages()[0].lr, len(cfg.yaml_text()) > 0)\n"
    )
    proc = heavy_modules_after(probe, tmp_path)
    assert "REFUSED run config: seed=-1 is out of range" in proc.stdout
