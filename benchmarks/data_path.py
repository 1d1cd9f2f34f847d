"""The real-size data path, measured: ``bench run --data llava`` on generated LLaVA-format data at 336 px.

    python benchmarks/data_path.py [--images 2000] [--large 20000] [--steps 12] [--batch-size 8] [--repeats 3]

A real-geometry CLIP-L/336 (576 patches of width 1024, random weights, 1 layer, built locally), LLaVA-1.5's
mlp2x_gelu, the tiny Llama (the LLM is not what is measured here), stage 1 of llava-1.5-pretrain for ``--steps``
steps. Each configuration runs as its own ``bench run`` process, interleaved over ``--repeats`` rounds:

- ``off``:  ``--feature-cache off``, the encoder runs on every batch;
- ``cold``: ``--feature-cache on`` on an empty cache (rows written as batches first need them);
- ``warm``: the same again (every row read back);
- ``cold-large``: the cold run on ``--large`` images, one step: the time to the first step must not grow with data.

Printed per configuration: time to the first step, training samples/s, encoder forwards, feature bytes on disk per
image, the peak RSS of the run's process tree; median and min-max over the rounds. Also the cost of an image
identity (a ``stat``) against hashing the file's bytes. Data and cache go to ``--work`` (default a temporary dir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENCODER = "random:openai/clip-vit-large-patch14-336:layers=1"


def make_data(folder: Path, n: int, size: int = 336) -> Path:
    """n JPEGs (smooth random colour fields, about 10 KB each) in 10 sub-folders and their LLaVA JSON."""
    json_path = folder / "chat.json"
    if json_path.exists() and len(json.loads(json_path.read_text())) == n:
        return json_path
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        sub = folder / "images" / f"{i % 10:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(sub / f"{i:06d}.jpg", quality=90)
        records.append(
            {
                "id": f"{i:06d}",
                "image": f"{i % 10:02d}/{i:06d}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
                    {"from": "gpt", "value": f"a field of colours number {i}"},
                ],
            }
        )
    json_path.write_text(json.dumps(records))
    return json_path


def bench_run(work: Path, data: Path, out: Path, cache: str, steps: int, batch_size: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        "--data",
        "llava",
        "--data-path",
        str(data),
        "--image-folder",
        str(data.parent / "images"),
        "--held-out",
        "0.005",
        "--encoder",
        "clip",
        "--encoder-checkpoint",
        ENCODER,
        "--layer",
        "-1",
        "--connector",
        "mlp2x_gelu",
        "--llm",
        "tinyllama",
        "--recipe",
        "llava-1.5-pretrain",
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        "1",
        "--eval-limit",
        "1",
        "--no-profile",
        "--feature-cache",
        cache,
        "--out",
        str(out),
    ]
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "CONNECTOR_ZOO_CACHE": str(work / "cache"), "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"bench run failed:\n{output[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {
        "first_step_s": results["seconds_to_first_step"],
        "samples_per_s": results["train_samples_per_second"],
        "forwards": results["encoder_forwards"],
        "disk_bytes": results["feature_cache"]["disk_bytes"],
        "peak_rss_mb": usage.ru_maxrss / 1024,  # the largest process of the tree (Linux: KiB)
        "wall_s": time.perf_counter() - started,
    }


def identity_cost(folder: Path, n: int = 2000) -> tuple[float, float]:
    """Microseconds per image: the identity this project uses (realpath + stat) and a SHA-256 of the bytes."""
    from bench.data.images import FileImages

    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))[:n]
    table = FileImages(folder, names)
    t0 = time.perf_counter()
    for i in range(len(names)):
        table.identity(i)
    t1 = time.perf_counter()
    for name in names:
        hashlib.sha256((folder / name).read_bytes()).hexdigest()
    t2 = time.perf_counter()
    return (t1 - t0) / len(names) * 1e6, (t2 - t1) / len(names) * 1e6


def summarize(rows: list[dict], key: str, fmt: str = ".3g") -> str:
    values = [r[key] for r in rows]
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", help="where data, cache and runs go (default: a temporary directory, removed)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="czoo-data-path-"))
    t0 = time.perf_counter()
    small = make_data(work / f"data-{args.images}", args.images)
    large = make_data(work / f"data-{args.large}", args.large) if args.large else None
    print(f"data: {args.images:,} and {args.large:,} JPEGs at 336 px in {time.perf_counter() - t0:.0f} s, {work}")
    stat_us, hash_us = identity_cost(small.parent / "images")
    print(f"image identity: stat {stat_us:.1f} µs/image, SHA-256 of the file {hash_us:.1f} µs/image")
    # build the presets once, outside the measurement
    bench_run(work, small, work / "runs" / "warmup", "off", 1, 2)
    rows: dict[str, list[dict]] = {"off": [], "cold": [], "warm": [], "cold-large": []}
    for r in range(args.repeats):
        for name in rows:
            if name.startswith("cold"):
                shutil.rmtree(work / "cache" / "features", ignore_errors=True)
            data = large if name == "cold-large" else small
            if data is None:
                continue
            steps = 1 if name == "cold-large" else args.steps
            cache = "off" if name == "off" else "on"
            row = bench_run(work, data, work / "runs" / f"{name}-{r}", cache, steps, args.batch_size)
            rows[name].append(row)
            print(f"  round {r} {name:<10} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    print(f"\n{args.steps} steps x batch {args.batch_size}; median (min-max) over {args.repeats} interleaved rounds")
    print(f"{'config':<11} {'first step s':<20} {'samples/s':<20} {'forwards':<9} {'disk MB/img':<12} peak RSS MB")
    for name, got in rows.items():
        if not got:
            continue
        per_image = f"{got[0]['disk_bytes'] / got[0]['forwards'] / 1e6:.3g}" if name.startswith("cold") else "-"
        print(
            f"{name:<11} {summarize(got, 'first_step_s'):<20} {summarize(got, 'samples_per_s'):<20} "
            f"{got[0]['forwards']:<9} {per_image:<12} {summarize(got, 'peak_rss_mb', '.0f')}"
        )
    if rows["cold-large"]:
        ratio = statistics.median(r["first_step_s"] for r in rows["cold-large"]) / statistics.median(
            r["first_step_s"] for r in rows["cold"]
        )
        print(f"time to first step, {args.large:,} / {args.images:,} images: {ratio:.2f}x")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
