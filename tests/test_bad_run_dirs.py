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


def command_line(command: str, run, tmp_path) -> list[str]:
    return {
        "generate": ["generate", str(run), "--prompt", "hi"],
        "eval": ["eval", str(run)],
        "profile": ["profile", "--run", str(run)],
        "prune-curve": ["prune-curve", str(run), "--ratios", "1,0.5"],
        "export-hf": ["export-hf", "--run", str(run), "--out", str(tmp_path / "llava")],
        "save-pretrained": ["save-pretrained", str(run), str(tmp_path / "hf")],
    }[command]


COMMANDS = ["generate", "eval", "profile", "prune-curve", "export-hf", "save-pretrained"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_config_that_is_not_an_object_is_one_line(saved, command, capsys, tmp_path):
    """Every command that reads a run directory says the same one line (one loader), and writes nothing."""
    (saved / "config.json").write_text("[]")
    assert main(command_line(command, saved, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is not a run config (a JSON object)" in err[0], err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "llava").exists()


def test_a_model_config_with_a_list_for_a_part_is_one_line(saved, capsys):
    specs = json.loads((saved / "vlm_config.json").read_text())
    (saved / "vlm_config.json").write_text(json.dumps({**specs, "encoder": ["clip"]}))
    write_manifest(saved, ["trainable.safetensors", "vlm_config.json"])
    assert main(["generate", str(saved), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a model config" in err[0], err


@pytest.mark.parametrize("content", ["[1]", '{"model_type": "llama"}'])
def test_a_directory_of_another_model_is_named_not_loaded(tmp_path, content):
    """VLM.load reads run and transformers directories; a config.json of another kind says what it found."""
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match="is not a connector-zoo model \\(model_type '(list|llama)'\\)"):
        VLM.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds neither vlm_config.json"):
        VLM.load(tmp_path / "missing")
