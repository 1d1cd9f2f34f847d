"""``bench sweep --launcher slurm``: each unfinished cell a Slurm job (one job array per submission), through submitit.

A cell's job runs exactly what the local launcher runs in-process (``bench.run.job.run``) into the cell's normal run
directory, resuming from its last checkpoint when the directory already holds a run: so a job that Slurm requeues
(preemption, ``scontrol requeue``, a time limit reached: submitit's checkpoint hook requeues it) continues where its
last checkpoint left it, with the numbers an uninterrupted run gives. Cells running at once share the encoder's
feature cache (``bench/data/store.py``: one set of shard files per writer process, rows valid once indexed) and the
world and backbones (built once, atomically, by the first job that needs them).

``<sweep>/.slurm/`` holds submitit's logs and ``jobs.json`` (cell -> job id, log paths), which ``bench sweep --status``
reads beside ``squeue``: a cell is done (its results are there), pending or running (Slurm says so), failed (its job
left Slurm without results; the error's last line, from submitit's result file or the job's stderr), or not submitted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report.tables import RESULTS
from bench.run.job import run
from bench.train.settings import RunConfig
from connector_zoo.io import write_json

SLURM_DIR = ".slurm"
#: Slurm job states of a job that may still produce its cell's results (any other state in the queue: it ended)
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "PREEMPTED",
}
JOBS = "jobs.json"


@dataclass
class SlurmSettings:
    """Resources per cell (one job each) and how many cells of a submission run at once."""

    partition: str | None = None
    cpus: int = 2
    gpus: int = 0
    mem_gb: float | None = None
    time_min: int = 240
    parallel: int = 4

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit's AutoExecutor parameters."""
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus,
            "slurm_array_parallelism": self.parallel,
            "tasks_per_node": 1,
            "nodes": 1,
        }
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        return params


def checkpointable():
    import submitit

    return submitit.helpers.Checkpointable


def cell_job_class():
    """The job class (submitit imported only when a sweep goes to Slurm)."""

    class CellJob(checkpointable()):
        """One sweep cell as a Slurm job. ``checkpoint`` (submitit's, on a time limit or preemption signal) requeues
        the same callable; the run resumes from the cell's last checkpoint because its directory holds a run."""

        def __init__(self, cfg: RunConfig, cell: Path, dotted: bool, tracking: dict[str, Any]):
            self.cfg, self.cell, self.dotted, self.tracking = cfg, Path(cell), dotted, tracking

        def __call__(self) -> str:
            from connector_zoo.io import keep_freed_memory

            keep_freed_memory()  # as the bench command does
            resume = (self.cell / "config.json").exists()
            print(f"{self.cell.name}: {'resuming' if resume else 'running'}", flush=True)
            run(self.cfg, self.cell, resume=resume, allow_dotted_paths=self.dotted, tracking=self.tracking)
            return str(self.cell)

    return CellJob


def submit(out: Path, cells: list[tuple[Path, RunConfig, bool, dict[str, Any]]], settings: SlurmSettings, log=print):
    """Submit ``cells`` (cell directory, config, dotted paths allowed, tracking) as one job array; record their job
    ids in ``<out>/.slurm/jobs.json``."""
    if shutil.which("sbatch") is None:
        raise OSError("--launcher slurm needs Slurm's sbatch on PATH (this machine has none); use --launcher local")
    try:
        import submitit
    except ImportError as err:
        raise OSError("--launcher slurm submits through submitit: pip install 'connector-zoo[slurm]'") from err

    folder = out / SLURM_DIR
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(**settings.parameters(f"sweep-{out.name}"))
    job_class = cell_job_class()
    with executor.batch():
        jobs = [executor.submit(job_class(cfg, cell, dotted, tracking)) for cell, cfg, dotted, tracking in cells]
    record = read_jobs(out)
    for (cell, *_), job in zip(cells, jobs):
        record[cell.name] = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
        log(f"{cell.name}: submitted as Slurm job {job.job_id} (log {job.paths.stdout})")
    write_json(folder / JOBS, record)
    return jobs


def read_jobs(out: Path) -> dict[str, dict[str, str]]:
    path = out / SLURM_DIR / JOBS
    return json.loads(path.read_text()) if path.exists() else {}


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job id still in the queue (PENDING, RUNNING, REQUEUED, ...); the others are gone."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    proc = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True, check=False
    )
    states = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        states[job] = state
    return states


def active_jobs(out: Path) -> dict[str, str]:
    """Cell -> job id of the cells of ``out`` whose job is still pending or running in Slurm."""
    jobs = read_jobs(out)
    queued = queue_states([e["job_id"] for e in jobs.values()])
    return {cell: e["job_id"] for cell, e in jobs.items() if queued.get(e["job_id"]) in ACTIVE}


def failure(entry: dict[str, str]) -> str:
    """The last line of a failed cell's error: submitit's result file (the exception), else its job's stderr."""
    results = sorted(Path(entry["stdout"]).parent.glob(f"{entry['job_id']}_*_result.pkl"))  # submitit's, task 0
    if results:
        from submitit.core.utils import pickle_load

        outcome, value = pickle_load(results[0])
        if outcome == "error":
            lines = [x for x in str(value).strip().splitlines() if x.strip()]
            return lines[-1] if lines else "an error without a message"
    stderr = Path(entry["stderr"])
    if stderr.exists():
        lines = [x for x in stderr.read_text(errors="replace").splitlines() if x.strip()]
        if lines:
            return lines[-1]
    return "the job left Slurm without results and without a log"


def status(out: Path) -> list[dict[str, str]]:
    """One row per cell of the sweep directory: cell, state, job id, log, error (failed cells)."""
    out = Path(out)
    jobs = read_jobs(out)
    cells = sorted({p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} | set(jobs))
    queued = queue_states([jobs[c]["job_id"] for c in cells if c in jobs])
    rows = []
    for name in cells:
        entry = jobs.get(name, {})
        row = {"cell": name, "job_id": entry.get("job_id", ""), "log": entry.get("stdout", ""), "error": ""}
        if any((out / name / r).exists() for r in RESULTS):
            row["state"] = "done"
        elif queued.get(entry.get("job_id")) in ACTIVE:
            row["state"] = queued[entry["job_id"]].lower()
        elif entry:
            row["state"], row["error"] = "failed", failure(entry)
        else:
            row["state"] = "not submitted"
        rows.append(row)
    return rows


def format_status(rows: list[dict[str, str]]) -> str:
    lines = [f"{'cell':<48} {'state':<14} {'job':<12} log / error"]
    for r in rows:
        detail = r["error"] or r["log"]
        lines.append(f"{r['cell']:<48} {r['state']:<14} {r['job_id']:<12} {detail}")
    return "\n".join(lines)


def wait(out: Path, poll_s: float = 5.0, log=print) -> list[dict[str, str]]:
    """Poll until no cell of the sweep is pending or running; returns the final status."""
    said = None
    while True:
        rows = status(out)
        counts = {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}}
        line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        if line != said:
            log(f"sweep {out}: {line}")
            said = line
        if not any(r["state"] not in ("done", "failed", "not submitted") for r in rows):
            return rows
        time.sleep(poll_s)
