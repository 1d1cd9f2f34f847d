"""lmms-eval integration (issue 14): the mini world as an lmms-eval task equals `bench eval`, lmms-eval's own CLI
finds the model, a POPE-format local copy is scored by lmms-eval's POPE metric code, and offline failures are one
line. Skipped with the reason when lmms-eval is absent (the core install); .ci/run installs it (the dev extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import MICRO, ROOT, bench

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: pip install 'connector-zoo[eval]'")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms") / "run"
    proc = bench([*MICRO, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_world_task_gives_bench_evals_numbers(run):
    """The same 8 test questions and 8 compositional ones: per question the same answer text, the same exact match,
    and the same overall and per-type accuracy as the run's own evaluation (bench eval's code path)."""
    from bench.evaluate.lmms import evaluate_tasks

    recorded = evaluate_tasks(run, ["connector_zoo_world", "connector_zoo_world_compositional"], limit=8)
    results = json.loads((run / "results.json").read_text())
    for task, split in (("connector_zoo_world", "test"), ("connector_zoo_world_compositional", "compositional")):
        ours, theirs = results["metrics"][split]["accuracy"], recorded[task]
        assert theirs["samples"] == ours["count"] == 8
        assert theirs["per_question"]["ids"] == ours["per_question"]["ids"]
        assert theirs["per_question"]["correct"] == [float(c) for c in ours["per_question"]["correct"]]
        examples = results["metrics"][split]["examples"]
        assert theirs["per_question"]["answers"][: len(examples)] == [e["answer"] for e in examples]
        assert theirs["metrics"]["exact_match"] == pytest.approx(ours["exact_match"])
        per_type = {k.removeprefix("exact_match_"): v for k, v in theirs["metrics"].items() if k != "exact_match"}
        assert per_type == pytest.approx(ours["per_type"])
        entry = results["lmms_eval"][task]  # recorded in the run, with what produced it
        assert entry["lmms_eval_version"] == "0.7.3" and len(entry["config_hash"]) == 16
        assert entry["visual_tokens_per_image"] == 64.0


def test_lmms_evals_own_command_line_finds_the_model(run):
    """`python -m lmms_eval --model connector_zoo --model_args run=RUN` (the entry point in pyproject.toml)."""
    from bench.evaluate.lmms import TASKS_DIR

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "connector_zoo",
            "--model_args",
            f"run={run}",
            "--tasks",
            "connector_zoo_world",
            "--include_path",
            str(TASKS_DIR),
            "--limit",
            "4",
            "--batch_size",
            "4",
        ],
        cwd=run.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "connector_zoo_world" in proc.stdout and "exact_match" in proc.stdout


def pope_copy(root, n: int = 20):
    """A POPE-format local copy (lmms-lab's columns: question_id, question, answer, image, category, image_source)
    over the world's test images: "Is there a <colour> <shape> in the image?" with the world's yes/no truth."""
    import datasets

    from bench.data.world import World

    world = World(progress=False)
    rows = {"question_id": [], "question": [], "answer": [], "image": [], "category": [], "image_source": []}
    for i, record in enumerate(world.records("test")):
        for qa in record["qa"]:
            if qa["type"] == "exist" and len(rows["question"]) < n:
                rows["question_id"].append(str(len(rows["question"])))
                rows["question"].append(qa["question"].replace("?", " in the image?"))
                rows["answer"].append(qa["answer"].lower())
                rows["image"].append(world.image("test", i))
                rows["category"].append("random")
                rows["image_source"].append(record["id"])
    features = datasets.Features(
        {k: datasets.Value("string") for k in rows if k != "image"} | {"image": datasets.Image()}
    )
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(root / "pope")
    return rows


def test_a_pope_format_local_copy_is_scored_by_lmms_evals_pope_code(run, tmp_path):
    from bench.evaluate.accuracy import normalize

    rows = pope_copy(tmp_path)
    assert len(rows["question"]) == 20 and {"yes", "no"} <= set(rows["answer"])
    pope_yaml = os.path.join(os.path.dirname(lmms_eval.__file__), "tasks", "pope", "pope.yaml")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pope_local.yaml").write_text(
        f"include: {pope_yaml}\ntask: pope_local\ndataset_path: {tmp_path / 'pope'}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
    )
    out = bench(["eval", str(run), "--tasks", "pope_local", "--include-path", str(tmp_path / "tasks")])
    assert out.returncode == 0, out.stderr[-3000:]
    entry = json.loads((run / "results.json").read_text())["lmms_eval"]["pope_local"]
    answers = entry["per_question"]["answers"]
    assert len(answers) == 20
    # POPE's accuracy: its own normalisation is lower().strip(); the metrics come from lmms-eval's utils
    hits = [a.lower().strip() == t for a, t in zip(answers, rows["answer"])]
    assert entry["metrics"]["pope_accuracy"] == pytest.approx(sum(hits) / 20)
    assert {"pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"} <= set(entry["metrics"])
    assert entry["metrics"]["pope_yes_ratio"] == pytest.approx(rows["answer"].count("yes") / 20)
    assert all(isinstance(normalize(a), str) for a in answers)
    assert "pope_local: pope_accuracy" in out.stdout


def test_a_task_whose_data_is_not_local_fails_in_one_line(run, tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty-hf-home"), "HF_HUB_OFFLINE": "1"}
    out = bench(["eval", str(run), "--tasks", "pope"], env=env)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "lmms-lab-encoder/POPE" in last and "HF_HUB_OFFLINE" in last and "Traceback" not in out.stderr
    out = bench(["eval", str(run), "--tasks", "no_such_task_xyz"], env=env)
    assert out.returncode != 0 and "unknown lmms-eval task 'no_such_task_xyz'" in out.stderr


def test_report_has_a_column_per_task_with_mean_and_std(run, tmp_path):
    """`bench report` over two seeds of a run with lmms-eval results: one column per task, headed by the task and
    its own metric, mean ± sample std by hand."""
    from bench.evaluate.lmms import evaluate_tasks
    from bench.report.tables import aggregate, table

    evaluate_tasks(run, ["connector_zoo_world"], limit=4)
    first = json.loads((run / "results.json").read_text())
    second = json.loads(json.dumps(first))
    second["config"]["seed"] = first["config"]["seed"] + 1
    second["lmms_eval"]["connector_zoo_world"]["metrics"]["exact_match"] = 0.5
    rows = aggregate([first, second])
    col = "lmms:connector_zoo_world:exact_match"
    mine = next(r for r in rows if not r["name"].startswith("blind"))
    a = first["lmms_eval"]["connector_zoo_world"]["metrics"]["exact_match"]
    assert mine[col] == pytest.approx(((a + 0.5) / 2, abs(a - 0.5) / 2**0.5))
    text = table(rows)
    assert "connector_zoo_world exact_match" in text.splitlines()[0]
    assert f"{(a + 0.5) / 2:.3f} ± {abs(a - 0.5) / 2**0.5:.3f}" in text


def test_loglikelihood_is_the_continuations_log_probability(run):
    """Multiple-choice scoring: the sum of log p(continuation token | prefix) read from transformers' own forward on
    the token ids, and greedy = every continuation token is the argmax."""
    import torch
    from lmms_eval.api.instance import Instance

    from connector_zoo.model.lmms import ConnectorZooLMM

    model = ConnectorZooLMM(run=str(run))
    model.task_dict = {"t": {"test": [{"q": 0}]}}
    requests = [
        Instance(
            "loglikelihood",
            ("How many sides has a triangle?", cont, lambda doc: [], 0, "t", "test"),
            idx=i,
            metadata={"task": "t", "doc_id": 0, "repeats": 1},
        )
        for i, cont in enumerate([" Three.", " blue square"])
    ]
    got = model.loglikelihood(requests)
    llm = model.vlm.llm
    for (logprob, greedy), r in zip(got, requests):
        prompt = llm.encode_prompt([{"role": "user", "content": r.args[0]}])
        cont = llm.tokenizer(r.args[1], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = llm.model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
        rows = logits[len(prompt) - 1 : -1].log_softmax(-1)
        assert logprob == pytest.approx(rows[range(len(cont)), cont].sum().item(), rel=1e-4, abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
    assert got[0][0] != got[1][0]
