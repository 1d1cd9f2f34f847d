"""The compute precision of a model: what ``--precision`` resolves to, its autocast context, and the precision a
saved run trained with (evaluation, generation and lmms-eval compute in it). The training side of the policy (backbone
storage dtype, fp32 master weights, memory) is ``bench/train/precision.py``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from connector_zoo.io import read_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(name: str, cuda: bool | None = None) -> str:
    """The compute precision accelerate gets: ``no``, ``bf16`` or ``fp16``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name not in ("auto", "no", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, no (fp32), bf16 or fp16, not {name!r}")
    if name == "auto":
        if not cuda:
            return "no"  # fp32 on CPU: deterministic, and bf16 autocast is not faster on small CPUs
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and not cuda:
        return "bf16"  # accelerate ignores fp16 on CPU; bf16 autocast is the 16-bit path the CPU has
    return "no" if name == "fp32" else name


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The autocast context of a compute precision (a no-op for fp32)."""
    device_type = torch.device(device).type
    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


def run_precision(run_dir) -> str:
    """The compute precision a run directory trained with: as its ``results.json`` records it (``--precision auto``
    on a CPU is decided by measurement when the run starts), else as its config resolves here; ``no`` for a model
    directory without a run config."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return "no"
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a run config (a JSON object), but a {type(config).__name__}")
    results = Path(run_dir) / "results.json"
    if results.exists():
        recorded = read_json(results)
        compute = recorded.get("precision", {}).get("compute") if isinstance(recorded, dict) else None
        if compute in ("no", "bf16", "fp16"):
            return "bf16" if compute == "fp16" and not torch.cuda.is_available() else compute
    return resolve_precision(config.get("precision", "auto"))
