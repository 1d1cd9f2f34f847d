"""Every path a GPU user takes, in minutes: one line per path with pass/fail, seconds and peak GPU memory.

    python benchmarks/gpu_check.py                 # real geometry, random weights, on the GPU (<= 8 min on one H100)
    python benchmarks/gpu_check.py --size micro    # the same paths on the tiny presets, on any machine (the suite
                                                   # runs this on CPU: tests/test_gpu_check.py)

Real geometry: CLIP-L/336 + mlp2x_gelu + a 2-layer Vicuna-7B width (the LLaVA-1.5 geometry) and SigLIP-so400m/384 +
mlp2x_gelu + a 2-layer Qwen3-4B width, random weights built offline from their configs (``random:<hub id>``), on a
LLaVA-JSON set of 8 images written here. The paths, each a ``bench`` command as a user types it:

- ``stage1-bf16``: stage 1 (connector only) under bf16 autocast, LLaVA-1.5's pretrain recipe;
- ``stage2-fsdp2``: stage 2 (connector + LLM) fully sharded with FSDP2 (``--shard full``; one process: FSDP2's code
  path over a process group of one), bf16 parameters, fp32 reduction;
- ``stage2-lora``, ``stage2-qlora`` (bitsandbytes 4-bit; only where bitsandbytes imports and CUDA is there);
- ``stage2-checkpointing``: gradient checkpointing; ``stage2-sdpa-packed``: several samples a row through the
  per-sample sdpa kernel (``--packing on``);
- ``kill-resume``: stage 2 killed (SIGKILL) after its second step and resumed: the losses of an unkilled run;
- ``eval``, ``generate``, ``export-hf`` on the fine-tuned run.

A line per path, then the total; the exit status is 1 if any path failed. Peak memory is the run's own record (CUDA's
max allocated; the process's peak RSS on a CPU) where the path trains, else not measured ("-").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data.length_mix import write_noise_captions  # noqa: E402

GEOMETRIES = {
    "real": [
        ("clip", "random:openai/clip-vit-large-patch14-336", "vicuna", "random:lmsys/vicuna-7b-v1.5:layers=2"),
        ("siglip", "random:google/siglip-so400m-patch14-384", "qwen3", "random:Qwen/Qwen3-4B:layers=2"),
    ],
    "micro": [("clip", None, "vicuna", None), ("siglip", None, "qwen3", None)],
}


def write_data(root: Path) -> list[str]:
    """8 LLaVA-JSON records over 400x300 noise images; the data flags of ``bench run``."""
    chat = write_noise_captions(root)
    return ["--data", "llava", "--data-path", str(chat), "--image-folder", str(root / "images")]


def bench(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def losses(run: Path) -> list[float]:
    record = json.loads((run / "results.json").read_text())
    return [h["loss"] for stage in record["loss_history"] for h in stage]


def peak_mb(run: Path) -> str:
    try:
        record = json.loads((run / "results.json").read_text())
    except FileNotFoundError:
        return "-"
    peaks = [s.get("memory", {}).get("peak_bytes") for s in record.get("training", [])]
    peaks = [p for p in peaks if p]
    return f"{max(peaks) / 2**20:,.0f} MB" if peaks else "-"


def qlora_available() -> str | None:
    """None when QLoRA can run here, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    return None


def check(size: str, out: Path, geometry: int | None = None) -> list[dict]:
    data = write_data(out / "data")
    precision = "bf16"
    rows = []

    def path(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            outcome, detail, run = fn()
        except Exception as err:  # noqa: BLE001 (a path that raises is a failed path, the others still run)
            outcome, detail, run = "FAIL", f"{type(err).__name__}: {err}", None
        seconds = time.perf_counter() - start
        row = {"path": name, "outcome": outcome, "seconds": seconds, "peak": peak_mb(run) if run else "-"}
        row["detail"] = detail
        rows.append(row)
        print(f"{name:<32} {outcome:<5} {seconds:7.1f} s  {row['peak']:>10}  {detail}", flush=True)

    def ran(proc: subprocess.CompletedProcess, run: Path | None, what: str = ""):
        if proc.returncode != 0:
            tail = [x for x in (proc.stderr or proc.stdout).splitlines() if x.strip()]
            return "FAIL", tail[-1] if tail else f"exit {proc.returncode}", run
        return "PASS", what, run

    def one(enc: str, enc_ckpt: str | None, llm: str, llm_ckpt: str | None) -> None:
        tag = f"{enc}+{llm}"
        components = ["--encoder", enc, "--llm", llm, "--connector", "mlp2x_gelu"]
        if enc_ckpt:
            components += ["--encoder-checkpoint", enc_ckpt]
        if llm_ckpt:
            components += ["--llm-checkpoint", llm_ckpt]
        base = [*components, *data, "--batch-size", "2", "--grad-accum", "1", "--eval-limit", "1", "--no-profile"]
        stage1 = out / f"{tag}-stage1"
        stage2 = out / f"{tag}-stage2"

        def train(run: Path, *flags: str, env=None):
            return ran(bench(["run", *base, *flags, "--out", str(run)], env=env), run)

        path(
            f"{tag} stage1-bf16",
            lambda: train(stage1, "--recipe", "llava-1.5-pretrain", "--steps", "2", "--precision", precision),
        )
        finetune = ["--recipe", "llava-1.5-finetune", "--steps", "2", "--precision", precision]
        init = ["--init-connector", str(stage1)]
        path(
            f"{tag} stage2-fsdp2",
            lambda: train(stage2, *finetune, *init, "--shard", "full", "--backbone-dtype", "fp32"),
        )
        path(f"{tag} stage2-lora", lambda: train(out / f"{tag}-lora", *finetune, *init, "--lora"))
        why_not = qlora_available()
        if why_not:
            rows.append({"path": f"{tag} stage2-qlora", "outcome": "n/a", "seconds": 0.0, "peak": "-"})
            print(f"{tag + ' stage2-qlora':<32} n/a       -            -  not run: {why_not}", flush=True)
        else:
            path(f"{tag} stage2-qlora", lambda: train(out / f"{tag}-qlora", *finetune, *init, "--qlora"))
        path(
            f"{tag} stage2-checkpointing",
            lambda: train(out / f"{tag}-ckpt", *finetune, *init, "--gradient-checkpointing"),
        )
        path(f"{tag} stage2-sdpa-packed", lambda: train(out / f"{tag}-packed", *finetune, *init, "--packing", "on"))

        def kill_resume():
            flags = [*finetune[:3], "3", *finetune[4:], "--save-every", "1"]
            reference, killed = out / f"{tag}-ref", out / f"{tag}-killed"
            outcome = train(reference, *flags)
            if outcome[0] != "PASS":
                return outcome
            proc = bench(["run", *base, *flags, "--out", str(killed)], env={"CONNECTOR_ZOO_KILL_AT": "step:2:2"})
            if proc.returncode == 0:
                return "FAIL", "the kill point was not reached", killed
            outcome = ran(bench(["run", "--resume", str(killed)]), killed)
            if outcome[0] != "PASS":
                return outcome
            a, b = losses(reference), losses(killed)
            worst = max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b))
            same = len(a) == len(b) and worst <= 1e-3
            return ("PASS" if same else "FAIL"), f"resumed losses within {worst:.1e} of the unkilled run's", killed

        path(f"{tag} kill-resume", kill_resume)
        path(f"{tag} eval", lambda: ran(bench(["eval", str(stage2), "--eval-limit", "1"]), None))
        image = out / "data" / "images" / "0.png"
        generate = ["generate", str(stage2), "--image", str(image), "--prompt", "Describe.", "--max-new-tokens", "4"]
        path(f"{tag} generate", lambda: ran(bench(generate), None))
        export = ["export-hf", "--run", str(stage2), "--out", str(out / f"{tag}-hf")]
        path(f"{tag} export-hf", lambda: ran(bench(export), None))

    for g, components in enumerate(GEOMETRIES[size]):
        if geometry is None or g == geometry:
            one(*components)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["real", "micro"], default="real")
    p.add_argument("--out", help="where the runs go (default: a temporary directory)")
    p.add_argument("--geometry", type=int, choices=[0, 1], help="only the first (0) or second (1) geometry")
    args = p.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"gpu_check ({args.size} geometry) on {device}, torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows = check(args.size, Path(args.out or tmp), args.geometry)
    failed = [r["path"] for r in rows if r["outcome"] == "FAIL"]
    total = time.perf_counter() - start
    print(f"{len(rows) - len(failed)} of {len(rows)} paths passed or not applicable, {total:.0f} s in all", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
