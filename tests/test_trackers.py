"""``--report-to``: what the trackers received is what the run recorded (TensorBoard's event files and wandb's offline
run read back), the run's settings as hyper-parameters, a sweep's cells grouped and tagged; a tracker that is not
installed is one line before anything is written."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MICRO, bench

from bench.train.tracking import eval_values, flat_settings, parse_report_to, step_values
from bench.train.trainer import batch_tokens
from connector_zoo.model.inputs import VLMInputs
from connector_zoo.settings import SettingError

TB = [*MICRO, "--report-to", "tensorboard"]


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def close(a: float, b: float) -> bool:  # TensorBoard stores float32
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


@pytest.mark.slow
def test_tensorboard_holds_the_runs_own_records_step_by_step(tmp_path):
    run = tmp_path / "tb"
    proc = bench([*TB, "--out", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    logged = scalars(run / "trackers" / "connector-zoo")
    # stage 2's steps follow stage 1's on one axis; every recorded value of every step is the logged one
    history = [(stage, h) for stage, hist in enumerate(results["loss_history"], start=1) for h in hist]
    assert len(history) == 12 and len(logged["train/loss"]) == 12
    for key in ("loss", "lr", "grad_norm", "samples_per_second", "tokens_per_second", "peak_memory_mb"):
        want = [(i, h[key]) for i, (_, h) in enumerate(history, start=1)]
        got = logged[f"train/{key}"]
        assert [s for s, _ in got] == [s for s, _ in want] and all(close(g, w) for (_, g), (_, w) in zip(got, want))
    assert [v for _, v in logged["train/stage"]] == [float(s) for s, _ in history]
    assert all(h["grad_norm"] > 0 and h["tokens_per_second"] > h["samples_per_second"] for _, h in history)
    validated = [(i, h["val_loss"]) for i, (_, h) in enumerate(history, start=1) if "val_loss" in h]
    assert validated and all(close(g, w) for (_, g), (_, w) in zip(logged["val/loss"], validated))
    # the evaluation by question type, at the last step
    for tag, value in eval_values(results["metrics"]).items():
        assert logged[tag][-1][0] == 12 and close(logged[tag][-1][1], value), tag
    test = results["metrics"]["test"]["accuracy"]
    assert set(test["per_type"]) and all(f"eval/test/{kind}" in logged for kind in test["per_type"])
    # the run's settings as hyper-parameters (accelerate writes them beside the event file too)
    (hparams,) = glob.glob(str(run / "trackers" / "connector-zoo" / "*" / "hparams.yml"))
    settings = yaml.safe_load(Path(hparams).read_text())
    assert settings["connector.name"] == "mlp2x_gelu" and settings["seed"] == 0
    assert settings["report_to"] == '["tensorboard"]'
    assert "trackers: tensorboard" in proc.stdout


def wandb_records(run_dir) -> tuple[list[dict], dict, object]:
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    store = DataStore()
    store.open_for_scan(path)
    history, config, run = [], {}, None

    def items(update) -> dict:  # a key with "/" is stored as its parts
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}

    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(items(record.history.item))
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "run":
            run = record.run
    return history, config, run


@pytest.mark.slow
def test_a_sweep_logs_each_cell_to_wandb_offline_grouped_by_the_sweep_with_its_settings_as_tags(tmp_path):
    pytest.importorskip("wandb")  # installed with the eval extra (lmms-eval pins it), so with dev
    out = tmp_path / "mysweep"
    argv = ["sweep", "--connector", "cls_prune[keep_ratio=0.5]", "--seeds", "1", "--world-scale", "0.01"]
    argv += ["--pretrain-steps", "3", "--steps", "3", "--eval-limit", "6", "--report-to", "wandb", "--out", str(out)]
    # wandb's temporary, cache, config and data folders in the test's own directory, not /tmp or ~
    private = {name: str(tmp_path / name.lower()) for name in ("TMPDIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
    for folder in private.values():
        Path(folder).mkdir()
    proc = bench(
        argv, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", **private, "WANDB_DATA_DIR": private["TMPDIR"]}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cell,) = [p for p in out.iterdir() if (p / "results.json").exists()]
    history, config, run = wandb_records(cell)
    assert run.run_group == "mysweep" and run.display_name == cell.name
    assert set(run.tags) == {"encoder:clip", "connector:cls_prune", "keep_ratio:0.5", "llm:tinyllama", "seed:1"}
    assert config["connector.keep_ratio"] == 0.5 and config["seed"] == 1
    results = json.loads((cell / "results.json").read_text())
    recorded = [h["loss"] for hist in results["loss_history"] for h in hist]
    assert [h["train/loss"] for h in history if "train/loss" in h] == recorded
    final = [h for h in history if "eval/test/exact_match" in h]
    assert final and final[-1]["eval/test/exact_match"] == results["metrics"]["test"]["accuracy"]["exact_match"]


def test_report_to_names_are_checked_and_all_means_those_installed(monkeypatch):
    import bench.train.tracking as tracking

    assert parse_report_to(None) == [] and parse_report_to("none") == []
    assert parse_report_to("tensorboard,wandb,tensorboard") == ["tensorboard", "wandb"]
    monkeypatch.setattr(tracking, "available", lambda name: name in ("tensorboard", "trackio"))
    assert parse_report_to("all") == ["tensorboard", "trackio"]
    with pytest.raises(SettingError, match="'tensorbored' unknown; known: none, all, tensorboard"):
        parse_report_to("tensorbored")
    with pytest.raises(SettingError, match="'none' cannot be combined"):
        parse_report_to("none,wandb")
    with pytest.raises(SettingError, match="--report-to mlflow: not installed here; pip install mlflow"):
        tracking.check_installed(["tensorboard", "mlflow"])


def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import bench.train.tracking as tracking
    from bench.cli import main

    monkeypatch.setattr(tracking, "available", lambda name: name != "mlflow")
    out = tmp_path / "never"
    assert main([*MICRO, "--report-to", "mlflow", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--report-to mlflow: not installed here; pip install mlflow" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_tracker_values_by_hand():
    entry = {"step": 3, "loss": 1.5, "lr": 2e-3, "grad_norm": 0.5, "samples_per_second": 8.0, "val_loss": None}
    assert step_values(entry, 2) == {
        "train/loss": 1.5,
        "train/lr": 2e-3,
        "train/grad_norm": 0.5,
        "train/samples_per_second": 8.0,
        "train/stage": 2.0,
    }
    metrics = {
        "test": {
            "accuracy": {"exact_match": 0.5, "per_type": {"colour": 1.0, "count": 0.0}},
            "blind": {"exact_match": 0.25},
            "caption_loss": 2.0,
        },
        "compositional": {},  # not evaluated: nothing logged
    }
    assert eval_values(metrics) == {
        "eval/test/exact_match": 0.5,
        "eval/test/blind_exact_match": 0.25,
        "eval/test/colour": 1.0,
        "eval/test/count": 0.0,
        "eval/test/caption_loss": 2.0,
    }
    assert flat_settings(
        {"connector": {"name": "qformer", "num_queries": 8}, "stages": [{"stage": 1}], "lora": None}
    ) == {
        "connector.name": "qformer",
        "connector.num_queries": 8,
        "stages": '[{"stage": 1}]',
        "lora": "null",
    }


def test_tokens_per_step_count_visual_tokens_for_the_placeholder_and_no_padding():
    inputs = VLMInputs([torch.arange(5), torch.arange(3), torch.arange(7)], has_image=[True, False, True])
    # 15 text tokens, two of them <image> placeholders, replaced by 9 and 4 visual tokens
    assert batch_tokens(inputs, torch.tensor([9, 4])) == 15 - 2 + 13
    assert batch_tokens(VLMInputs([torch.arange(4)], has_image=[False]), None) == 4
