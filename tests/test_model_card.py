"""The model card (README.md beside a saved model): the Hub's metadata, the components, the recipe stage by stage, the
data, the evaluation by question type beside the blind baseline, and the command and settings that train it again."""

from __future__ import annotations

import re

import yaml

from bench.train.settings import RunConfig
from connector_zoo.model.modeling import RUN_SETTINGS_NAME, ConnectorZooForConditionalGeneration, model_card
from connector_zoo.model.vlm import VLM

RESULTS = {
    "config": {"recipe": "mini", "seed": 2, "data": {"kind": "world", "world": {"train": 200, "image_size": 64}}},
    "visual_tokens_per_image": {"mean": 32.0},
    "training": [
        {"steps": 4, "final_loss": 5.5, "train_samples_per_second": 70.0, "trainable_parameters": 100},
        {"steps": 6, "final_loss": 4.25, "train_samples_per_second": 30.0, "trainable_parameters": 900},
    ],
    "precision": {"compute": "no", "backbone": "fp32"},
    "versions": {"torch": "2.14.1", "transformers": "5.25.0"},
    "wall_time_seconds": 12.3,
    "git_commit": "abc123",
    "metrics": {
        "test": {
            "accuracy": {"exact_match": 0.625, "count": 8, "per_type": {"colour": 0.75, "shape": 0.5}},
            "blind": {"exact_match": 0.125},
        },
        "compositional": {},
    },
}


def test_the_card_holds_metadata_components_recipe_data_metrics_and_the_command():
    settings = RunConfig(connector={"name": "linear"}, seed=2).yaml_text()
    model = VLM.build({"name": "clip"}, {"name": "linear"}, {"name": "tinyllama"})
    specs = {**model.specs(), "llm": {"name": "vicuna", "checkpoint": "lmsys/vicuna-7b-v1.5"}}
    card = model_card(model, specs, RESULTS, settings)
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-text-to-text"
    assert front["base_model"] == "lmsys/vicuna-7b-v1.5" and "linear" in front["tags"]
    assert "# linear connector: clip -> vicuna" in card
    assert '| llm | `{"checkpoint": "lmsys/vicuna-7b-v1.5", "name": "vicuna"}` |' in card
    assert "Recipe `mini`, seed 2; data: the embedded mini world, 200 training images of 64 px" in card
    assert "| 2 | 6 | 4.2500 | 30.0 | 900 |" in card  # stage 2's row
    assert "compute fp32, frozen weights in fp32" in card and "commit `abc123`" in card
    assert "| split | questions | exact match | blind | colour | shape |" in card
    assert "| test | 8 | 0.625 | 0.125 | 0.750 | 0.500 |" in card
    assert "| compositional | 0 | not evaluated |" in card
    assert f"bench run --config {RUN_SETTINGS_NAME} --out runs/again" in card
    block = re.search(r"```yaml\n(.*?)```", card, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load(settings)


def test_a_local_checkpoint_is_no_base_model_and_a_card_without_a_run_has_no_run_sections(tmp_path):
    model = VLM.build({"name": "clip"}, {"name": "linear"}, {"name": "tinyllama"})
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "llm").mkdir()
    specs = {**model.specs(), "llm": {"name": "tinyllama", "checkpoint": str(tmp_path / "org" / "llm")}}
    card = model_card(model, specs, None)
    assert "base_model" not in card and "## Training" not in card and "## Reproduce" not in card


def test_save_pretrained_writes_the_card_and_the_settings_beside_the_weights(tmp_path):
    model = ConnectorZooForConditionalGeneration.from_vlm(
        VLM.build({"name": "clip"}, {"name": "linear"}, {"name": "tinyllama"})
    )
    settings = RunConfig(connector={"name": "linear"}).yaml_text()
    model.save_pretrained(tmp_path / "out", results=RESULTS, settings=settings)
    assert (tmp_path / "out" / RUN_SETTINGS_NAME).read_text() == settings
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation" in card and "## Reproduce" in card and (tmp_path / "out" / "model.safetensors").exists()
