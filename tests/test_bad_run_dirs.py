"""A run directory whose config files are valid JSON of the wrong shape (issue 34, class 4) gets one line from
``bench generate`` and ``bench eval``, as every other bad input does, not a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main
from connector_zoo.io import write_manifest
from connector_zoo.model.vlm import VLM


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"})
    return vlm.save(tmp_path / "run")


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_run_config_that_is_not_an_object_is_one_line(saved, command, capsys):
    (saved / "config.json").write_text("[]")
    args = [command, str(saved), *(["--prompt", "hi"] if command == "generate" else [])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is not a run config (a JSON object)" in err[0], err


def test_a_model_config_with_a_list_for_a_part_is_one_line(saved, capsys):
    specs = json.loads((saved / "vlm_config.json").read_text())
    (saved / "vlm_config.json").write_text(json.dumps({**specs, "encoder": ["clip"]}))
    write_manifest(saved, ["trainable.safetensors", "vlm_config.json"])
    assert main(["generate", str(saved), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a model config" in err[0], err
