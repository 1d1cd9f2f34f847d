"""lmms-eval from the harness: ``bench eval RUN --tasks ...`` and the mini world as an lmms-eval task.

- :func:`world_task_data` writes a world's test and compositional questions as a local ``datasets`` dataset
  (``save_to_disk``; one row per question, in ``bench eval``'s order, with the image), next to the world in the cache,
  atomically; ``bench world build`` calls it and the shipped task (``bench/evaluate/lmms_tasks``) reads it.
- :func:`evaluate_tasks` runs lmms-eval's ``simple_evaluate`` with :class:`connector_zoo.model.lmms.ConnectorZooLMM`
  on a run directory, offline by default (a task whose data is not local fails in one line naming it), and records
  every task's metrics in the run's ``results.json`` under ``lmms_eval`` with lmms-eval's version and a hash of the
  task's configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.data.formats import world_dataset
from bench.data.world import World, WorldConfig
from bench.evaluate.accuracy import qa_samples, strip_image
from bench.train.settings import RunConfig
from connector_zoo.io import materialize, read_json, write_json

TASKS_DIR = Path(__file__).parent / "lmms_tasks"
WORLD_SPLITS = ("test", "compositional")


def world_task_data(world) -> Path:
    """The world's questions as a local dataset (DatasetDict test / compositional), built once per world."""

    def build(tmp: Path) -> None:
        import datasets

        splits = {}
        for split in WORLD_SPLITS:
            ds = world_dataset(world, split)
            rows = {"id": [], "question": [], "answer": [], "type": [], "image": []}
            for s in qa_samples(ds):
                rows["id"].append(s.id)
                rows["question"].append(strip_image(s.messages[:1])[0]["content"])
                rows["answer"].append(s.messages[-1]["content"])
                rows["type"].append(s.meta["type"])
                rows["image"].append(world.image(split, s.image))
            features = datasets.Features(
                {k: datasets.Value("string") for k in rows if k != "image"} | {"image": datasets.Image()}
            )
            splits[split] = datasets.Dataset.from_dict(rows, features=features)
        was_off = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # one line from `bench world build`, not a bar per split
        try:
            datasets.DatasetDict(splits).save_to_disk(str(tmp / "data"))
        finally:
            if not was_off:
                datasets.enable_progress_bars()

    return materialize(world.dir / "lmms_eval", build) / "data"


def prepare_world_task(run_dir: Path) -> Path | None:
    """The world task's data for the world a run was trained on; None for a run on other data."""

    cfg = RunConfig.from_file(Path(run_dir) / "config.json")
    if cfg.data.get("kind", "world") != "world":
        return None
    return world_task_data(World(WorldConfig(**cfg.data.get("world", {})), progress=False))


def default_world_task_data() -> Path:
    """The default world's task data (the task used without ``--model connector_zoo``)."""

    return world_task_data(World(progress=False))


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_offline(names: list[str], manager) -> None:
    """Refuse, in one line, a task whose dataset is neither a local directory nor in the datasets cache while the
    hub is offline (lmms-eval would retry a download for a minute, then fail with a traceback)."""
    if os.environ.get("HF_HUB_OFFLINE") != "1" and os.environ.get("HF_DATASETS_OFFLINE") != "1":
        return
    from huggingface_hub import scan_cache_dir

    try:
        cached = {r.repo_id for r in scan_cache_dir().repos if r.repo_type == "dataset"}
    except Exception:  # noqa: BLE001 (no cache directory at all)
        cached = set()
    for name in names:
        if name not in manager.all_tasks:
            raise ValueError(
                f"unknown lmms-eval task {name!r}; `python -m lmms_eval --tasks list` lists them, and "
                f"--include-path adds a folder of task YAML files"
            )
        config = manager._get_config(name) if manager.task_index[name]["type"] == "task" else {}
        path = config.get("dataset_path")
        if not path or config.get("class") or Path(str(path)).exists() or path in cached:
            continue
        raise ValueError(
            f"task {name!r} reads the dataset {path!r}, which is not in the Hugging Face cache and the hub is offline: "
            f"download it once online (HF_HUB_OFFLINE=0, `bench eval --online`), point HF_HOME / HF_DATASETS_CACHE at "
            f"a cache that has it, or give a task YAML in --include-path whose dataset_path is a local copy "
            f"(dataset_kwargs: load_from_disk: true)"
        )


def per_question(samples: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, list]:
    """Each document's id (its ``id`` field, else lmms-eval's doc_id), answer and, where the task's first metric is a
    per-document number, its score: the paired comparisons of ``bench report`` read these."""
    samples = sorted(samples, key=lambda s: int(s["doc_id"]))
    first = next(iter(metrics), None)
    out: dict[str, list] = {
        "ids": [
            str(s["doc"].get("id", s["doc_id"])) if isinstance(s.get("doc"), dict) else str(s["doc_id"])
            for s in samples
        ],
        "answers": [s["filtered_resps"][0] if s.get("filtered_resps") else None for s in samples],
    }
    if first and all(isinstance(s.get(first), (int, float)) for s in samples):
        out["correct"] = [s[first] for s in samples]
    return out


def evaluate_tasks(
    run_dir: Path,
    tasks: list[str],
    limit: int | None = None,
    include_paths: list[str] = (),
    batch_size: int = 16,
    verify: bool = True,
    allow_dotted_paths: bool = False,
    online: bool = False,
) -> dict[str, dict[str, Any]]:
    """lmms-eval on a run: {task: {"metrics": {name: value}, ...}}; recorded in the run's results.json."""
    if not online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from lmms_eval.evaluator import simple_evaluate  # optional: the eval extra
    from lmms_eval.tasks import TaskManager

    from connector_zoo.model.lmms import ConnectorZooLMM  # needs lmms-eval too

    manager = TaskManager(verbosity="WARNING", include_path=[str(TASKS_DIR), *map(str, include_paths)])
    check_offline(tasks, manager)
    model = ConnectorZooLMM(
        run=str(run_dir), batch_size=batch_size, verify=verify, allow_dotted_paths=allow_dotted_paths
    )
    out = simple_evaluate(
        model=model,
        tasks=list(tasks),
        limit=limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    recorded: dict[str, dict[str, Any]] = {}
    for task, metrics in out["results"].items():
        values = {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and v == v
        }  # (NaN: a question type with no question)
        recorded[task] = {
            "metrics": values,
            "headline": next(iter(values), None),
            "lmms_eval_version": version("lmms_eval"),
            "config_hash": config_hash(out.get("configs", {}).get(task, {})),
            "limit": limit,
            "samples": out.get("n-samples", {}).get(task, {}).get("effective"),
            "per_question": per_question(out.get("samples", {}).get(task, []), values),
        }
    tokens = model.visual_tokens
    for entry in recorded.values():
        entry["visual_tokens_per_image"] = sum(tokens) / len(tokens) if tokens else None
    results_path = Path(run_dir) / "results.json"
    if results_path.exists():
        results = read_json(results_path)
        results.setdefault("lmms_eval", {}).update(recorded)
        write_json(results_path, results)
    return recorded
