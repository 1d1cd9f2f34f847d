"""``bench run --config`` / ``bench sweep --config``: a run's config.yaml trains the same run again, flags override a
file, and a bad file is one line naming the key and the file."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from conftest import MICRO, bench, computed

from bench.cli import COMMANDS, main
from bench.cli.config_file import parse_with_config
from bench.cli.parser import build_parser
from bench.cli.training import run_config_from_args
from bench.data.world import WorldConfig
from bench.train.recipes import RECIPES
from bench.train.settings import RunConfig


def parse(argv):
    return parse_with_config(build_parser(COMMANDS), argv)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.slow
def test_a_runs_config_yaml_trains_the_same_run_again(tmp_path):
    first = tmp_path / "first"
    proc = bench([*MICRO, "--connector", "cls_prune", "--connector-arg", "keep_ratio=0.5", "--out", str(first)])
    assert proc.returncode == 0, proc.stderr
    settings = yaml.safe_load((first / "config.yaml").read_text())
    assert settings["connector"] == {"name": "cls_prune", "keep_ratio": 0.5} and settings["stages"][0]["steps"] == 6
    # the copy beside the model card of <run>/hf (what a Hub page would offer) is the same file
    assert (first / "hf" / "run_config.yaml").read_text() == (first / "config.yaml").read_text()
    assert "bench run --config run_config.yaml" in (first / "hf" / "README.md").read_text()
    again = tmp_path / "again"
    proc = bench(["run", "--config", str(first / "hf" / "run_config.yaml"), "--out", str(again)])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    a, b = (json.loads((d / "results.json").read_text()) for d in (first, again))
    assert (
        computed(a["loss_history"]) == computed(b["loss_history"]) and len(a["loss_history"]) == 2
    )  # both stages, every step
    for split in ("test", "compositional"):
        assert a["metrics"][split]["accuracy"] == b["metrics"][split]["accuracy"]
        assert a["metrics"][split]["caption_loss"] == b["metrics"][split]["caption_loss"]


def test_the_written_settings_read_back_to_the_same_run_config(tmp_path):
    """Every field survives the YAML round trip, including the recipe's stages (written out), ``eval_limit: all``
    (None, not the default 1000) and a component given by mapping."""
    cfg = RunConfig(
        connector={"name": "qformer", "num_queries": 8},
        llm={"name": "qwen3", "checkpoint": "tiny"},
        recipe="mini-wide",
        seed=4,
        eval_limit=None,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "targets": "q_proj+v_proj"},
        gradient_checkpointing=True,
        max_length=96,
    )
    path = write(tmp_path, cfg.yaml_text(), "config.yaml")
    back = run_config_from_args(parse(["run", "--config", str(path)]))
    assert back.stages == RECIPES["mini-wide"]
    back.stages = []
    assert back == cfg


def test_flags_override_the_file_and_settings_merge(tmp_path):
    path = write(
        tmp_path,
        """
        connector: {name: cls_prune, keep_ratio: 0.5}
        seed: 1
        steps: 5
        world-scale: 0.5
        strict: true
        """,
    )
    cfg = run_config_from_args(
        parse(["run", "--config", str(path), "--seed", "2", "--connector-arg", "keep_ratio=0.25"])
    )
    assert cfg.seed == 2 and cfg.strict is True and cfg.connector == {"name": "cls_prune", "keep_ratio": 0.25}
    assert all(s["steps"] == 5 for s in cfg.stages) and cfg.data["world"] == WorldConfig().scaled(0.5).as_dict()
    cfg = run_config_from_args(parse(["run", "--config", str(path), "--connector", "linear"]))
    assert cfg.connector["name"] == "linear"
    # a run's whole data mapping, with a data option given on the command line laid over it
    data = {"kind": "world", "world": {"image_size": 64, "train": 30}, "pretrain": {"llm_level": "wide"}}
    path = write(tmp_path, yaml.safe_dump({"data": data}), "data.yaml")
    assert run_config_from_args(parse(["run", "--config", str(path)])).data == data
    cfg = run_config_from_args(parse(["run", "--config", str(path), "--qa-turns", "2", "--pretrain-steps", "3"]))
    assert cfg.data["qa_turns"] == 2 and cfg.data["world"] == data["world"]
    assert cfg.data["pretrain"] == {"llm_level": "wide", "encoder_steps": 3, "llm_steps": 3}
    assert "train_questions" not in cfg.data
    cfg = run_config_from_args(parse(["run", "--config", str(path), "--train-questions", "7", "--qa-turns", "7"]))
    assert cfg.data["train_questions"] == 7 and cfg.data["qa_turns"] == 7
    assert run_config_from_args(parse(["run", "--train-questions", "5"])).data["train_questions"] == 5


def test_lora_in_a_file_is_a_switch_a_string_or_a_mapping(tmp_path):
    from llms.lora import LORA_DEFAULTS

    for value, want in (
        ("true", LORA_DEFAULTS),
        ("false", None),
        ("r=16,alpha=32", {**LORA_DEFAULTS, "r": 16, "alpha": 32}),
        ("{r: 8, targets: q_proj+v_proj}", {**LORA_DEFAULTS, "r": 8, "targets": "q_proj+v_proj"}),
    ):
        path = write(tmp_path, f"lora: {value}\n")
        assert run_config_from_args(parse(["run", "--config", str(path)])).lora == want, value


def test_a_recipe_on_the_command_line_replaces_the_files_stages(tmp_path):
    path = write(tmp_path, RunConfig(recipe="mini").yaml_text(), "config.yaml")
    cfg = run_config_from_args(parse(["run", "--config", str(path), "--recipe", "mini-wide"]))
    assert cfg.recipe == "mini-wide" and cfg.resolved_stages() == RunConfig(recipe="mini-wide").resolved_stages()


BAD_FILES = {
    "unknown key": ("stepz: 3\n", "unknown key 'stepz' for bench run; known:"),
    "out of range": ("steps: -3\n", "steps: -3 is out of range; allowed: an integer >= 0"),
    "not a number": ("lr: fast\n", "lr: 'fast' is not a number > 0"),
    "not a switch": ("strict: 1\n", "strict: 1 is not true or false"),
    "not a choice": ("feature_cache: sometimes\n", "feature_cache: 'sometimes' is not one of auto, on, off"),
    "a list for one value": ("seed: [1, 2]\n", "seed: [1, 2] is a list; this option takes one value"),
    "a mapping without a name": ("connector: {keep_ratio: 0.5}\n", "connector: a component mapping needs a name"),
    "bad stages": ("stages: 3\n", "stages: a list of stage mappings"),
    "trust in a file": ("allow_dotted_paths: true\n", "key 'allow_dotted_paths' cannot be set in a file"),
    "resume in a file": ("resume: runs/x\n", "key 'resume' cannot be set in a file"),
    "not YAML": ("steps: [1,\nseed: 2\n", "not valid YAML at line"),
    "not a mapping": ("- steps\n- 3\n", "holds a mapping of option: value, not a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, case):
    text, expected = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", str(path), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_a_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert "nope.yaml: cannot read it" in err and len(err.strip().splitlines()) == 1


def test_a_sweep_file_names_the_same_grid_as_its_flags(tmp_path, monkeypatch):
    import bench.report.sweep as sweep_module

    seen = []
    monkeypatch.setattr(sweep_module, "sweep", lambda out, *grid, **launcher: seen.append((out, grid)) or [])
    monkeypatch.setattr("bench.cli.training.report", lambda cells, out: None)
    path = write(
        tmp_path,
        """
        connector: [linear, {name: cls_prune, keep_ratio: 0.5}, "qformer[num_queries=8]"]
        seeds: [0, 1]
        llm: tinyllama
        steps: 4
        world_scale: 0.01
        eval_limit: 6
        out: sweeps/from-file
        """,
        "sweep.yaml",
    )
    for argv in (
        ["sweep", "--config", str(path)],
        [
            "sweep",
            "--connector",
            "linear,cls_prune[keep_ratio=0.5],qformer[num_queries=8]",
            "--seeds",
            "0,1",
            "--steps",
            "4",
            "--world-scale",
            "0.01",
            "--eval-limit",
            "6",
            "--out",
            "sweeps/from-file",
        ],
    ):
        args = parse(argv)
        args.func(args)
    assert seen[0] == seen[1] and len(seen[0][1][1]) == 3 and seen[0][1][3] == [0, 1]
    args = parse(["sweep", "--config", str(path), "--seeds", "5"])
    args.func(args)
    assert seen[-1][1][3] == [5]


def test_the_example_files_in_the_docs_are_valid_for_their_command(tmp_path):
    """Every ```yaml block of README.md and docs/training.md that starts with ``# run.yaml`` or ``# sweep.yaml`` is a
    file its command accepts (the docs cannot show a key that does not exist)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = 0
    for doc in ("README.md", "docs/training.md"):
        for block in re.findall(r"```yaml\n(.*?)```", (root / doc).read_text(), re.S):
            match = re.match(r"# (run|sweep)\.yaml", block)
            if not match:
                continue
            path = write(tmp_path, block, f"{match.group(1)}-{found}.yaml")
            args = parse([match.group(1), "--config", str(path)])
            assert args.from_file, (doc, block)
            found += 1
    assert found >= 3


def test_length_grouping_is_the_recipes_unless_a_flag_or_the_file_says_otherwise(tmp_path):
    """LLaVA-1.5's fine-tuning scripts group by length (``--group_by_modality_length True``): the recipes do too, and
    ``--no-group-by-length`` (or ``group_by_length: false`` in a file) turns it off."""
    stages = run_config_from_args(parse(["run", "--recipe", "llava-1.5-finetune"])).resolved_stages()
    assert [s.group_by_length for s in stages] == [True]
    cfg = run_config_from_args(parse(["run", "--recipe", "llava-1.5-finetune-lora", "--no-group-by-length"]))
    assert [s.group_by_length for s in cfg.resolved_stages()] == [False]
    path = write(tmp_path, "recipe: mini\ngroup_by_length: true\n")
    assert all(s.group_by_length for s in run_config_from_args(parse(["run", "--config", str(path)])).resolved_stages())


def test_the_pretrained_level_brings_its_recipe_and_question_settings(tmp_path):
    """``--world-llm smollm2`` alone is the level's recipe (run B): recipe mini-smollm2, 7 fresh questions an image as
    branches; each is overridden by its own flag or a configuration file's key, and the other levels keep the plain
    defaults (no data option written, as their recorded cells were)."""
    level = run_config_from_args(parse(["run", "--world-llm", "smollm2"]))
    assert level.recipe == "mini-smollm2"
    assert {k: level.data[k] for k in ("qa_turns", "train_questions", "qa_branches")} == {
        "qa_turns": 7,
        "train_questions": 7,
        "qa_branches": True,
    }
    assert [(s.data, s.steps) for s in level.resolved_stages()] == [("captions", 150), ("questions", 150)]
    plain = run_config_from_args(parse(["run"]))
    assert plain.recipe == "mini" and plain.data == {"kind": "world"}
    wide = run_config_from_args(parse(["run", "--world-llm", "wide"]))
    assert wide.recipe == "mini" and "qa_turns" not in wide.data and "qa_branches" not in wide.data
    # a flag wins over the level; one turn has nothing to branch, so the branches go with it
    one = run_config_from_args(parse(["run", "--world-llm", "smollm2", "--qa-turns", "1", "--recipe", "mini"]))
    assert one.recipe == "mini" and "qa_turns" not in one.data and "qa_branches" not in one.data
    off = run_config_from_args(parse(["run", "--world-llm", "smollm2", "--no-qa-branches"]))
    assert off.data["qa_turns"] == 7 and "qa_branches" not in off.data
    # and so does a configuration file's key
    path = write(tmp_path, "world_llm: smollm2\nqa_turns: 3\ntrain_questions: 3\n")
    from_file = run_config_from_args(parse(["run", "--config", str(path)]))
    assert (from_file.data["qa_turns"], from_file.data["train_questions"], from_file.data["qa_branches"]) == (
        3,
        3,
        True,
    )
    with pytest.raises(SystemExit):  # --qa-branches takes no value: --no-qa-branches turns it off
        parse(["run", "--qa-branches", "yes"])
