"""The cost of each configuration of a resolution sweep, measured side by side: visual tokens per image, the encoder's
forward over the image's views, and the LLM's prefill, at batch 1, timed in interleaved rounds in one process.

    python benchmarks/resolution_cost.py sweeps/resolution [--seed 0] [--rounds 30]

Loads seed ``--seed``'s run of every configuration under the directory (tiled or not, as each was trained), takes the
first test image of their world (all runs of a resolution sweep share one), and prints per configuration: tokens, the
median encode and prefill milliseconds with their min-max over the rounds. Prefill is the LLM forward over the prompt
with the visual tokens spliced in (the connector and the AnyRes merge are not timed; the encoder is timed apart).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.evaluate.profile import interleaved_samples, prefill_fn
from bench.report.tables import name_runs, read_results, results_files, run_name
from bench.train.assemble import load_data
from bench.train.settings import RunConfig
from connector_zoo.model.vlm import VLM


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(2)
    records = []  # every record, so that configurations are named as `bench report` names them
    for f in results_files(Path(args.sweep)):
        records.append({**read_results(f), "dir": f.parent})
    name_runs(records)  # runs of one config_name with other settings (e.g. the encoder's input side) apart
    runs = sorted(
        (run_name(r), r["dir"])
        for r in records
        if r["config"]["seed"] == args.seed and (r["dir"] / "config.json").exists()  # else: kept without weights
    )
    if not runs:
        raise SystemExit(f"no run directory of seed {args.seed} with its weights under {args.sweep}")
    cfg = RunConfig.from_file(runs[0][1] / "config.json")
    _, _, eval_sets, _ = load_data(cfg, lambda m: None)
    test = next(iter(eval_sets.values()))
    image = test.images.load(next(s.image for s in test.samples if s.image is not None))
    encode_fns, prefill_fns, tokens = [], [], []
    for _, run in runs:
        vlm = VLM.load(run).eval()
        pixels, _ = vlm.preprocess([image])
        encode_fns.append(lambda vlm=vlm, pixels=pixels: torch.no_grad()(vlm.encode)(pixels))
        fn, n = prefill_fn(vlm, image)
        prefill_fns.append(fn)
        tokens.append(n)
    times = interleaved_samples([*encode_fns, *prefill_fns], args.rounds, warmup=3)
    enc, pre = times[: len(runs)], times[len(runs) :]
    threads = torch.get_num_threads()
    print(f"image {image.size[0]}x{image.size[1]}, {args.rounds} interleaved rounds, batch 1, {threads} threads")
    print(f"{'configuration':<64} {'tokens':>7} {'encode ms':>18} {'prefill ms':>18}")
    for (name, _), n, e, q in zip(runs, tokens, enc, pre):
        e_ms = f"{1000 * statistics.median(e):.2f} [{1000 * min(e):.2f}-{1000 * max(e):.2f}]"
        q_ms = f"{1000 * statistics.median(q):.2f} [{1000 * min(q):.2f}-{1000 * max(q):.2f}]"
        print(f"{name:<64} {n:>7} {e_ms:>18} {q_ms:>18}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
