"""Experiment trackers (``--report-to tensorboard,wandb,mlflow,trackio|all|none``) through accelerate's own
(``Accelerator(log_with=...)``, ``init_trackers``, ``accelerator.log``).

What a run logs, at one global step count across its stages (stage 2's first step follows stage 1's last):

- every optimizer step: ``train/loss``, ``train/lr`` (and ``train/connector_lr`` where the connector has its own),
  ``train/grad_norm`` (before clipping), ``train/samples_per_second`` and ``train/tokens_per_second`` (that step's,
  visual tokens included), ``train/padding_share``, ``train/peak_memory_mb`` (the process's peak RSS on CPU, CUDA's
  max allocated on GPU) and ``train/stage``; ``val/loss`` where the stage validates. These are the values of the
  run's own history (``results.json`` ``loss_history``): the tracker gets the same numbers, not a second computation;
- after evaluation, per split: ``eval/<split>/exact_match``, ``eval/<split>/blind_exact_match``, one
  ``eval/<split>/<question type>`` each, and the loss;
- the run's settings as hyper-parameters (flattened: ``connector.keep_ratio``; lists as JSON).

Files stay in the run directory (``<run>/trackers``: TensorBoard's event files, MLflow's file store) unless the tracker
keeps its own (wandb's ``WANDB_DIR``, trackio's cache). A sweep names each cell's run after the cell and groups them by
the sweep's name, with the cell's settings as tags (wandb ``group``/``tags``, MLflow tags, trackio ``group``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connector_zoo.settings import SettingError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PROJECT = "connector-zoo"
LOG_DIR = "trackers"


def available(name: str) -> bool:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

    return {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
        "trackio": is_trackio_available,
    }[name]()


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """``tensorboard,wandb`` -> the names; ``none`` -> []; ``all`` -> every tracker installed here. A name that is not
    a tracker is one line naming the known ones (the command line checks names; :func:`check_installed` whether they
    run here)."""
    if value is None:
        return []
    parts = value if isinstance(value, list) else [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in parts if p not in (*TRACKERS, "all", "none")]
    if unknown:
        raise SettingError(
            f"report_to: {', '.join(map(repr, unknown))} unknown; known: none, all, {', '.join(TRACKERS)}"
        )
    if "none" in parts:
        if len(parts) > 1:
            raise SettingError(f"report_to: 'none' cannot be combined with {[p for p in parts if p != 'none']}")
        return []
    if "all" in parts:
        return [t for t in TRACKERS if available(t)]
    return list(dict.fromkeys(parts))


def check_installed(names: list[str]) -> None:
    missing = [n for n in names if not available(n)]
    if missing:
        raise SettingError(
            f"--report-to {','.join(missing)}: not installed here; pip install {' '.join(missing)} "
            "(tensorboard comes with connector-zoo[trackers]), or leave it out"
        )


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A run's settings as one level of scalars, as trackers take hyper-parameters (nested keys joined by dots, lists
    as JSON, None as "null")."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_settings(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def start(accelerator, settings: dict[str, Any], out_dir: Path, group: str | None, tags: list[str]) -> None:
    """``init_trackers`` with the run's settings; the run is named after its directory, grouped by ``group``."""
    if not accelerator.log_with:
        return
    name = Path(out_dir).name
    init_kwargs = {
        "wandb": {"name": name, "group": group, "tags": tags, "dir": str(out_dir)},
        "mlflow": {"run_name": name, "tags": {"sweep": group or "", **dict(t.split(":", 1) for t in tags)}},
        "trackio": {"name": name, "group": group},
    }
    accelerator.init_trackers(PROJECT, config=flat_settings(settings), init_kwargs=init_kwargs)


def step_values(entry: dict[str, Any], stage: int) -> dict[str, float]:
    """One history entry of the trainer as tracker scalars."""
    names = {
        "loss": "train/loss",
        "lr": "train/lr",
        "connector_lr": "train/connector_lr",
        "grad_norm": "train/grad_norm",
        "samples_per_second": "train/samples_per_second",
        "tokens_per_second": "train/tokens_per_second",
        "padding_share": "train/padding_share",
        "peak_memory_mb": "train/peak_memory_mb",
        "val_loss": "val/loss",
    }
    values = {tag: float(entry[key]) for key, tag in names.items() if entry.get(key) is not None}
    return {**values, "train/stage": float(stage)}


def eval_values(metrics: dict[str, Any]) -> dict[str, float]:
    """A run's evaluation (``results.json`` ``metrics``) as tracker scalars; splits not evaluated are left out."""
    values: dict[str, float] = {}
    for split, m in metrics.items():
        if not m:
            continue
        if "accuracy" in m:
            values[f"eval/{split}/exact_match"] = float(m["accuracy"]["exact_match"])
            values[f"eval/{split}/blind_exact_match"] = float(m["blind"]["exact_match"])
            for kind, score in m["accuracy"].get("per_type", {}).items():
                values[f"eval/{split}/{kind}"] = float(score)
        for key in ("caption_loss", "loss"):
            if m.get(key) is not None:
                values[f"eval/{split}/{key}"] = float(m[key])
    return values
