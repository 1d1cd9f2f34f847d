"""Paired comparisons between configurations of a sweep, on the same test questions and seeds.

    python benchmarks/sweep_pairs.py sweeps/zoo cls_prune:random_keep ldpv2:mlp2x_gelu ...

Each ``A:B`` names two connectors of the sweep (the configuration ``<encoder> + A + <llm> (<recipe>)``, or a full
configuration name as the report prints it). Printed per pair: A's accuracy minus B's in points with the paired
bootstrap 95 % interval and McNemar's exact p-value (``bench/evaluate/stats.py``, as the report's "vs best" column),
and the number of (seed, question) pairs compared. The zoo-sweep findings in docs/mini-world.md were computed with
this script.
"""

from __future__ import annotations

import sys

from bench.evaluate.stats import paired
from bench.report.tables import load_runs, per_question, run_name


def main() -> int:
    if len(sys.argv) < 3 or any(":" not in a for a in sys.argv[2:]):
        sys.exit(__doc__.splitlines()[2].strip())
    runs = load_runs([sys.argv[1]])
    names = sorted({run_name(r) for r in runs})

    def find(part: str) -> str:
        hits = [n for n in names if n == part or f" + {part} + " in n]
        if len(hits) != 1:
            sys.exit(f"{part!r} names {len(hits)} configurations of {sys.argv[1]}; there are: {', '.join(names)}")
        return hits[0]

    for pair in sys.argv[2:]:
        a, b = (find(x) for x in pair.split(":", 1))
        p = paired(per_question(runs, a), per_question(runs, b))
        if p is None:
            print(f"{pair}: no common per-question records")
            continue
        print(
            f"{pair}: {100 * p['diff']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] points, "
            f"McNemar p={p['p']:.2g}, {p['questions']} (seed, question) pairs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
