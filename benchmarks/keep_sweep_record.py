"""Keep a sweep's record with the code: ``python benchmarks/keep_sweep_record.py SWEEP_DIR sweeps/NAME``.

For each finished cell of SWEEP_DIR (a ``bench sweep --out`` directory), writes ``sweeps/NAME/<cell>/results.json.gz``
(gzip without a timestamp: the same results give the same bytes) and copies ``pruning_curve.json`` where there is one.
Checkpoints stay behind. ``bench report sweeps/NAME`` reads the record; ``bench sweep --out sweeps/NAME`` with the same
grid skips the recorded cells and runs only the missing ones. Prints what it wrote."""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[0])
    sweep, record = Path(sys.argv[1]), Path(sys.argv[2])
    for results in sorted(sweep.glob("*/results.json")):
        cell = record / results.parent.name
        cell.mkdir(parents=True, exist_ok=True)
        target = cell / "results.json.gz"
        tmp = target.with_suffix(".gz.tmp")
        tmp.write_bytes(gzip.compress(results.read_bytes(), compresslevel=9, mtime=0))
        tmp.replace(target)
        print(f"wrote {target} ({target.stat().st_size:,} bytes)")
        curve = results.parent / "pruning_curve.json"
        if curve.exists():
            shutil.copy(curve, cell / curve.name)
            print(f"wrote {cell / curve.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
