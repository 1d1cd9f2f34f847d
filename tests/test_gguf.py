"""A GGUF file as the LLM (issue 32, item 1): ``--llm-checkpoint path/to/model.gguf`` or ``hub-id:file.gguf`` loads
through transformers' ``gguf_file=`` with its tokenizer and chat template, computes what the same weights compute
from safetensors, is refused for the wrong backend, and serves every command."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench, install_in_hf_cache
from gguf_file import tiny_llama_checkpoints
from test_data import e2e_rows

from connector_zoo.settings import SettingError
from llms import build_llm

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "The circle is red."},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny Llama preset as a safetensors directory and as a GGUF file (``gguf_file.tiny_llama_checkpoints``)."""
    return tiny_llama_checkpoints(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def gguf_path(checkpoints):
    return checkpoints[1]


def same_llm(a, b) -> None:
    """Equal token ids and labels for a conversation with an image, equal prompt ids, equal logits."""
    ea, eb = a.encode_conversation(CONVERSATION), b.encode_conversation(CONVERSATION)
    assert ea.input_ids == eb.input_ids and ea.labels == eb.labels
    assert a.encode_prompt(CONVERSATION[:1]) == b.encode_prompt(CONVERSATION[:1])
    assert (a.image_token_id, a.eos_token_id, a.pad_token_id) == (b.image_token_id, b.eos_token_id, b.pad_token_id)
    ids = torch.tensor([ea.input_ids])
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits, rtol=0, atol=0)


def test_a_gguf_file_is_the_same_llm_as_its_safetensors(checkpoints):
    safetensors, gguf_path = checkpoints
    from_gguf, from_safetensors = (
        build_llm("tinyllama", checkpoint=str(gguf_path)),
        build_llm("tinyllama", checkpoint=str(safetensors)),
    )
    same_llm(from_gguf, from_safetensors)
    assert from_gguf.tokenizer.chat_template == from_safetensors.tokenizer.chat_template  # the file's own


def test_a_gguf_file_of_a_hub_repository_loads_from_the_cache(checkpoints, tmp_path, monkeypatch):
    safetensors, gguf_path = checkpoints
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "tiny-llama.gguf").write_bytes(gguf_path.read_bytes())
    install_in_hf_cache(repo, "someone/tiny-llama-GGUF", tmp_path / "hub", monkeypatch)
    same_llm(
        build_llm("tinyllama", checkpoint="someone/tiny-llama-GGUF:tiny-llama.gguf"),
        build_llm("tinyllama", checkpoint=str(safetensors)),
    )


def test_a_gguf_file_is_refused_by_the_wrong_backend_and_when_missing(gguf_path):
    with pytest.raises(SettingError, match="holds a 'llama' model, but --llm qwen3 takes 'qwen3'.*--llm tinyllama"):
        build_llm("qwen3", checkpoint=str(gguf_path))
    with pytest.raises(SettingError, match="holds a 'llama' model"):  # a safetensors directory is checked too
        build_llm("qwen3", checkpoint=str(gguf_path.parent / "safetensors"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_llm("tinyllama", checkpoint=str(gguf_path.parent / "nope.gguf"))


@pytest.mark.slow
def test_every_command_runs_on_a_gguf_llm(gguf_path, tmp_path):
    """bench run (train a step per stage, evaluate), eval, generate, export-hf and save-pretrained on a run whose
    LLM is the GGUF file; the exported transformers model loads."""
    (tmp_path / "images").mkdir()
    records = []
    for rid, image, question, answer in e2e_rows(12):
        image.save(tmp_path / "images" / f"{rid}.png")
        records.append(
            {
                "id": rid,
                "image": f"{rid}.png",
                "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
            }
        )
    (tmp_path / "data.json").write_text(json.dumps(records))
    run = tmp_path / "run"
    proc = bench(
        [
            "run",
            "--data",
            "llava",
            "--data-path",
            str(tmp_path / "data.json"),
            "--image-folder",
            str(tmp_path / "images"),
            "--encoder-checkpoint",
            "tiny",
            "--llm",
            "tinyllama",
            "--llm-checkpoint",
            str(gguf_path),
            "--connector",
            "mlp2x_gelu",
            "--recipe",
            "budget",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(run),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert json.loads((run / "vlm_config.json").read_text())["llm"]["checkpoint"] == str(gguf_path)
    assert results["training"], results
    proc = bench(["eval", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = bench(
        [
            "generate",
            str(run),
            "--image",
            str(tmp_path / "images" / "r000.png"),
            "--prompt",
            "What colour is this picture?",
            "--max-new-tokens",
            "3",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = bench(["export-hf", "--run", str(run), "--out", str(tmp_path / "llava")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = bench(["save-pretrained", str(run), str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "llava") is not None
