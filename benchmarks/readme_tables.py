"""The README's two tables of the pretrained level, rebuilt from the kept records in ``sweeps/smollm2``.

    python benchmarks/readme_tables.py           # rewrite both tables (and the cell count) in README.md
    python benchmarks/readme_tables.py --check   # exit 1, with a diff, where README.md differs from the records

The zoo table is ``bench report``'s table of the level's zoo cells (the default recipe's, ``<encoder>--<connector>--
<llm>--s<seed>``, and the connectors at their papers' rates, ``...--mini-smollm2-paper-rates``; the other recipes and
settings are the directions' runs), with the columns the README shows and the world LLM named as what it is
(SmolLM2-135M, cut to its first layers and fine-tuned on the world's text; the records call the backend
``tinyllama``, the Llama architecture it loads through). The directions table is ``benchmarks/directions.py``'s on the
whole directory. The test suite runs ``--check`` (tests/test_benchmarks.py), so a README figure that no kept record
gives fails CI.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

from bench.report.tables import RESULTS, aggregate, load_runs, table
from connector_zoo.io import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from directions import Records, directions_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "smollm2"
#: (bench report's header, the README's), in the README's order; ``backbones`` only where the cells mix builds
COLUMNS = [
    ("configuration", "configuration"),
    ("seeds", "seeds"),
    ("backbones", "backbones"),
    ("test acc", "test"),
    ("comp. acc", "comp."),
    *((t, t) for t in ("colour", "shape", "size", "count", "position", "exist", "relation")),
    ("tokens/img", "tokens"),
    ("test vs best: diff [95 % CI], McNemar p", "test vs best [95 % CI], McNemar p"),
]
PAPER_RATES = "--mini-smollm2-paper-rates"
ZOO_START, DIRECTIONS_START = "| configuration | seeds |", "| direction | the paper |"
CELLS = re.compile(r"has \d+ of its 22 cells so far")


def zoo_cells(sweep: Path) -> list[Path]:
    """The cell directories of the zoo table: the default recipe's and the paper-rates ones."""
    out = []
    for d in sorted(sweep.iterdir()):
        parts = d.name.split("--")  # <encoder>--<connector>--<llm>--s<seed>[--<recipe or setting>]
        default = len(parts) == 4 and re.fullmatch(r"s\d+", parts[3])
        if (default or d.name.endswith(PAPER_RATES)) and any((d / f).exists() for f in RESULTS):
            out.append(d)
    return out


def zoo_table(sweep: Path) -> tuple[str, int]:
    """The README's zoo table from the records, and the number of default-recipe cells in it."""
    cells = zoo_cells(sweep)
    markdown = table(aggregate(load_runs(cells)), "markdown").split("\n\n")[0]  # the table without its note
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()]
    header = lines[0]
    shown = [(ours, theirs) for ours, theirs in COLUMNS if ours in header]
    out = ["| " + " | ".join(theirs for _, theirs in shown) + " |", "|" + "---|" * len(shown)]
    for cells_of_row in lines[2:]:
        row = dict(zip(header, cells_of_row))
        row["configuration"] = row["configuration"].replace("tinyllama", "SmolLM2-135M")
        if row.get("tokens/img"):
            row["tokens/img"] = str(int(float(row["tokens/img"].replace("**", "").split(" ±")[0])))
        if row["configuration"].startswith("blind"):  # what the LLM answers without the image: no seeds, no spread
            row["configuration"] = re.sub(r"^blind baseline: \S+", "blind baseline: the LLM", row["configuration"])
            row = {k: (v.split(" ±")[0] if k not in ("configuration", "backbones") else v) for k, v in row.items()}
            row["seeds"] = ""
        out.append("| " + " | ".join(row.get(ours, "") for ours, _ in shown) + " |")
    return "\n".join(out), sum(not d.name.endswith(PAPER_RATES) for d in cells)


def replace_table(text: str, start: str, new: str, after: str = "") -> str:
    """``text`` with the markdown table that begins with ``start`` (after the heading ``after``) replaced."""
    a = text.index(start, text.index(after) if after else 0)
    b = text.find("\n\n", a)
    return text[:a] + new + (text[b:] if b >= 0 else "\n")


def rebuilt(readme: str, sweep: Path) -> str:
    zoo, cells = zoo_table(sweep)
    directions, _ = directions_table(Records(sweep, "mlp2x_gelu"))
    readme = replace_table(readme, ZOO_START, zoo, after="### The zoo on the pretrained level")
    readme = replace_table(readme, DIRECTIONS_START, directions)
    if not CELLS.search(readme):
        raise ValueError("README.md no longer says how many of the zoo's 22 cells it has ('has N of its 22 cells')")
    return CELLS.sub(f"has {cells} of its 22 cells so far", readme)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 with a diff where they differ")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--sweep", type=Path, default=SWEEP)
    args = ap.parse_args()
    old = args.readme.read_text()
    new = rebuilt(old, args.sweep)
    if args.check:
        if new == old:
            print(f"{args.readme}: its tables are the records' ({args.sweep})")
            return 0
        diff = difflib.unified_diff(
            old.splitlines(), new.splitlines(), "README.md", "rebuilt from the records", lineterm=""
        )
        print("\n".join(diff))
        print(f"\n{args.readme} differs from the records in {args.sweep}: run python benchmarks/readme_tables.py")
        return 1
    if new != old:
        with atomic_path(args.readme) as tmp:
            tmp.write_text(new)
    print(f"{args.readme}: tables rebuilt from {args.sweep}" + ("" if new != old else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
