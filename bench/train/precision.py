"""Precision and memory policy: mixed precision by autocast, backbone weights in half, trainable weights in fp32.

- ``--precision`` (no | bf16 | fp16 | auto) is the *compute* precision: accelerate's autocast in training, the same
  autocast in validation, evaluation, generation, profiling and the pruning curve, so a number measured after training
  comes from the arithmetic the model trained with. ``auto`` is bf16 on GPUs that have it, fp16 on older GPUs, fp32
  on CPU. accelerate silently ignores fp16 on CPU, so fp16 on CPU runs bf16 autocast (said in the log).
- ``--backbone-dtype`` (fp32 | bf16 | fp16 | auto) is the *storage* dtype of the frozen encoder and LLM weights, given
  to ``from_pretrained`` so a 7B LLM is never materialised in fp32 first. ``auto`` is the precision's dtype on GPU and
  fp32 on CPU. Half-precision backbones need autocast (a half precision).
- Trainable parameters are always fp32 (master weights, fp32 AdamW states), whatever the checkpoint file holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from connector_zoo.io import cache_dir, read_json, write_json
from connector_zoo.model.precision import DTYPES, autocast


def resolve_backbone_dtype(name: str | None, precision: str, cuda: bool | None = None) -> str:
    """The storage dtype of frozen backbone weights: ``fp32``, ``bf16`` or ``fp16``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    name = name or "auto"
    if name == "auto":
        return precision if cuda and precision in ("bf16", "fp16") else "fp32"
    if name not in DTYPES:
        raise ValueError(f"--backbone-dtype must be auto, fp32, bf16 or fp16, not {name!r}")
    if name != "fp32" and precision == "no":
        raise ValueError(
            f"--backbone-dtype {name} needs mixed precision: half-precision weights meet fp32 trainable weights only "
            f"under autocast; add --precision {name} (or bf16)"
        )
    return name


def matmul_seconds(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> list[float]:
    """Seconds of ``repeats`` timed (m x k) @ (k x n) multiplies in ``dtype`` at the current thread count, after one
    untimed warm-up."""

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return times


def cpu_bf16_is_fast(m: int = 1536, k: int = 576, n: int = 1536, rounds: int = 5) -> bool:
    """Whether this CPU multiplies bf16 matrices of this shape (default: SmolLM2's MLP) at least 1.5x faster than fp32,
    timed here (AMX and AVX-512 BF16 CPUs: 3-7x faster; AVX2-only CPUs emulate bf16, up to 100x slower). The two
    dtypes are timed in alternating rounds and the best of each kept, so a burst of other work slows both sides
    rather than flipping the answer."""
    best = {torch.bfloat16: float("inf"), torch.float32: float("inf")}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = min(best[dtype], *matmul_seconds(m, k, n, dtype, repeats=2))
    return best[torch.bfloat16] * 1.5 < best[torch.float32]


def cpu_fields() -> tuple[dict[str, str], str]:
    """The first processor's model name and instruction-set flags in ``/proc/cpuinfo`` (``platform.processor()``
    where there is none), and the text they were read from."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
            fields.setdefault(key.strip(), value.strip())
    return fields, info


#: the instruction sets that decide a CPU's bf16 and fp32 matmul rates, as /proc/cpuinfo names them
RATE_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "asimd", "sve", "bf16")


def machine_info() -> dict[str, Any]:
    """The machine a run ran on, as its record keeps it: the CPU's model name, which of RATE_FLAGS it has, the
    thread count, the GPU's name (None on CPU). Records of two machines can differ in their backbones' bytes
    (``bench.report.builds``) and in every timing."""
    fields, info = cpu_fields()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "isa": [f for f in RATE_FLAGS if f in flags],
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cpu_key() -> str:
    """What decides this CPU's bf16 speed: the processor (model name and instruction-set flags), the thread count
    and the torch build; two machines that differ in any of these get their own measurement."""
    fields, info = cpu_fields()
    described = {
        "cpu": fields or info[:200],
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def cpu_bf16_forced() -> bool | None:
    """What ``CONNECTOR_ZOO_CPU_BF16`` (``1`` or ``0``) decides in place of :func:`cpu_bf16_decision`'s measurement;
    None when it is not set so."""
    forced = os.environ.get("CONNECTOR_ZOO_CPU_BF16")
    return forced == "1" if forced in ("0", "1") else None


def cpu_bf16_decision() -> bool:
    """:func:`cpu_bf16_is_fast`, measured once per machine (:func:`cpu_key`) and kept in the cache: a decision that
    keys a world LLM must not change with the load of the moment (the same machine would build a second one).
    ``CONNECTOR_ZOO_CPU_BF16=1`` or ``0`` decides instead of measuring."""
    forced = cpu_bf16_forced()
    if forced is not None:
        return forced
    key = cpu_key()
    path = cache_dir() / "machine" / f"cpu-bf16-{key}.json"
    if path.exists():
        return bool(read_json(path)["bf16_is_fast"])
    fast = cpu_bf16_is_fast()
    write_json(path, {"bf16_is_fast": fast, "cpu_key": key, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return fast


def training_step_seconds(vlm, inputs, precision: str) -> float:
    """Seconds of one forward and backward of ``vlm`` on ``inputs`` under ``precision``'s autocast; gradients are
    dropped and the random state restored, so the probe leaves the model as it found it."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        with autocast(precision, vlm.device):
            loss = vlm(inputs).loss
        if loss.requires_grad:
            loss.backward()
    vlm.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def cpu_precision_decision(vlm, inputs, rounds: int = 3, margin: float = 1.1) -> tuple[str, dict[str, Any]]:
    """``--precision auto`` on a CPU: bf16 autocast where this CPU runs this model's training step faster in it
    than in fp32 by ``margin``, fp32 otherwise; measured on the run's own model and first micro-batch (so the run's
    widths, and the casts autocast adds, are what is timed: at the mini world's width 128 a single bf16 matmul is
    faster on AVX-512 BF16 and AMX CPUs, yet a whole step can be slower). A warm-up step of each, then ``rounds``
    alternating rounds, the best of each kept. Cached per machine (:func:`cpu_key`) and model (its specs and the
    batch's shape); ``CONNECTOR_ZOO_CPU_BF16=1`` or ``0`` decides instead. Returns the precision and the record."""
    forced = os.environ.get("CONNECTOR_ZOO_CPU_BF16")
    if forced in ("0", "1"):
        return ("bf16" if forced == "1" else "no"), {"why": f"CONNECTOR_ZOO_CPU_BF16={forced}"}
    shape = [len(inputs.input_ids), max(len(ids) for ids in inputs.input_ids)]
    described = json.dumps({"cpu": cpu_key(), "model": vlm.specs(), "batch": shape}, sort_keys=True, default=str)
    key = hashlib.sha256(described.encode()).hexdigest()[:16]
    path = cache_dir() / "machine" / f"cpu-step-precision-{key}.json"
    if path.exists():
        record = read_json(path)
        return record["precision"], {**record, "why": record["why"] + " (measured earlier on this machine)"}
    for precision in ("no", "bf16"):  # warm-up: first-call allocations and kernel selection are not timed
        training_step_seconds(vlm, inputs, precision)
    best = {"no": float("inf"), "bf16": float("inf")}
    for _ in range(rounds):
        for precision in best:
            best[precision] = min(best[precision], training_step_seconds(vlm, inputs, precision))
    ratio = best["no"] / best["bf16"]
    precision = "bf16" if ratio >= margin else "no"
    why = (
        f"auto: a training step took {best['no'] * 1e3:.0f} ms in fp32 and {best['bf16'] * 1e3:.0f} ms under bf16 "
        f"autocast here ({ratio:.2f}x; bf16 from {margin}x)"
    )
    record = {"precision": precision, "fp32_seconds": best["no"], "bf16_seconds": best["bf16"], "why": why}
    write_json(path, {**record, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return precision, record


def upcast_trainable(params: list[torch.nn.Parameter]) -> None:
    """Trainable parameters in fp32 (master weights), whatever dtype they were loaded in."""
    for p in params:
        if p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()


def tensor_bytes(tensors) -> int:
    """Bytes this process holds for ``tensors`` (a sharded DTensor: its local shard; FSDP2, --shard full)."""
    from bench.train.sharding import local_bytes

    return local_bytes(tensors)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA's max allocated on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Bytes this process holds for parameters (all, trainable), gradients, optimizer state (their local shards when
    sharded), and the process's peak so far."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values()]
    on_cuda = any(p.is_cuda for p in params)
    peak = peak_memory_bytes(next(p.device for p in params if p.is_cuda) if on_cuda else torch.device("cpu"))
    return {
        "parameters_bytes": tensor_bytes(params),
        "trainable_parameters_bytes": tensor_bytes(p for p in params if p.requires_grad),
        # one gradient per trainable parameter, same dtype and shape (measured after the step zeroed them)
        "gradients_bytes": tensor_bytes(p for p in params if p.requires_grad),
        "optimizer_state_bytes": tensor_bytes(state),
        "peak_bytes": int(peak),
        "peak_kind": "cuda max_memory_allocated" if on_cuda else "process peak RSS (ru_maxrss)",
    }
