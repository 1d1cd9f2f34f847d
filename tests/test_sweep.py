"""`bench sweep` resumes a killed sweep without redoing finished cells; `bench report` is deterministic."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import bench

from connector_zoo.settings import SettingError

MICRO_SWEEP = [
    "sweep",
    "--connector",
    "linear,cls_prune[keep_ratio=0.5]",
    "--seeds",
    "0",
    "--world-scale",
    "0.01",
    "--pretrain-steps",
    "3",
    "--steps",
    "4",
    "--eval-limit",
    "6",
]


def test_killed_sweep_resumes_and_report_is_deterministic(tmp_path):
    out = tmp_path / "sweep"
    # killed at step 3 of the first cell's first stage, then the sweep is run again
    killed = bench([*MICRO_SWEEP, "--out", str(out)], env={"CONNECTOR_ZOO_KILL_AT": "step:1:3"})
    assert killed.returncode != 0
    cells = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(cells) == 1 and not (cells[0] / "results.json").exists()
    again = bench([*MICRO_SWEEP, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and again.stdout.count("running") == 1
    cells = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(cells) == 2 and all((c / "results.json").exists() for c in cells)
    finished = {c: (c / "results.json").stat().st_mtime_ns for c in cells}
    third = bench([*MICRO_SWEEP, "--out", str(out)])
    assert third.returncode == 0 and third.stdout.count("finished, skipped") == 2
    assert finished == {c: (c / "results.json").stat().st_mtime_ns for c in cells}
    # the table: one row per configuration, the blind baseline as a row, rebuilt byte for byte
    table = (out / "table.md").read_text()
    assert "clip + linear + tinyllama (mini)" in table and "cls_prune[keep_ratio=0.5]" in table
    assert "blind baseline: tinyllama without the image" in table and "**" in table
    report = bench(["report", str(out), "--out", str(tmp_path / "r1")])
    assert report.returncode == 0, report.stderr[-2000:]
    bench(["report", str(out), "--out", str(tmp_path / "r2")])
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes()
    assert (tmp_path / "r1" / "table.md").read_text() == table
    assert (tmp_path / "r1" / "accuracy_vs_tokens.png").stat().st_size > 1000
    tokens = {json.loads((c / "results.json").read_text())["visual_tokens_per_image"]["mean"] for c in cells}
    assert tokens == {64.0, 32.0}


def test_peer_benchmark_trains_both_to_the_same_losses_step_by_step():
    """Same weights, samples, order and schedule: transformers' Trainer on Llava and ours give equal losses."""
    import dataclasses

    from bench.data.world import WorldConfig
    from bench.evaluate.peer import peer_benchmark
    from bench.train.settings import RunConfig

    world = {
        "kind": "world",
        "world": dataclasses.asdict(WorldConfig().scaled(0.01)),
        "pretrain": {"encoder_steps": 3, "llm_steps": 3},
    }
    r = peer_benchmark(RunConfig(connector={"name": "mlp2x_gelu"}, data=world), steps=4, batch_size=2, log=print)
    assert len(r["ours_losses"]) == len(r["peer_losses"]) == 4
    for ours, peer in zip(r["ours_losses"], r["peer_losses"]):
        assert abs(ours - peer) <= 1e-4 * abs(ours), (r["ours_losses"], r["peer_losses"])
    assert r["ours_losses"][0] != r["ours_losses"][-1]  # training moved
    assert r["ours_samples_per_second"] > 0 and r["peer_peak_rss_bytes"] > 0 and r["matmul_gflops_per_second"] > 0
    assert r["peer_gflops_per_second"] > 0 and r["train_flops_per_sample"] > 0


def test_peer_benchmark_under_bf16_runs_both_sides_under_autocast():
    """``precision="bf16"``: both trainers under bf16 autocast (ours' ``--precision bf16``, the peer's ``bf16=True``)
    agree step by step to bf16's rounding, and both differ from the fp32 losses of the same batches (each side did run
    under autocast; fp32 master weights on both)."""
    import dataclasses

    from bench.data.world import WorldConfig
    from bench.evaluate.peer import peer_benchmark
    from bench.train.settings import RunConfig

    world = {
        "kind": "world",
        "world": dataclasses.asdict(WorldConfig().scaled(0.01)),
        "pretrain": {"encoder_steps": 3, "llm_steps": 3},
    }
    cfg = RunConfig(connector={"name": "mlp2x_gelu"}, data=world)
    half = peer_benchmark(cfg, steps=3, batch_size=2, precision="bf16", log=print)
    full = peer_benchmark(cfg, steps=3, batch_size=2, log=print)
    assert half["precision"] == "bf16" and full["precision"] == "no"
    for ours, peer in zip(half["ours_losses"], half["peer_losses"]):
        assert abs(ours - peer) <= 2e-2 * abs(ours), (half["ours_losses"], half["peer_losses"])
    for side in ("ours", "peer"):
        assert half[side + "_losses"] != full[side + "_losses"], side
        assert all(abs(a - b) <= 3e-2 * abs(b) for a, b in zip(half[side + "_losses"], full[side + "_losses"]))
    with pytest.raises(SettingError, match="precision"):
        peer_benchmark(cfg, steps=3, batch_size=2, precision="fp8")


@pytest.mark.slow
def test_peer_command_prints_both_lines():
    proc = bench(["peer", "--steps", "2", "--batch-size", "2", "--world-scale", "0.01", "--pretrain-steps", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "connector-zoo (feature cache)" in proc.stdout and "transformers Trainer + Llava" in proc.stdout
    assert "ratio:" in proc.stdout and "GFLOP/s" in proc.stdout


def fake_run(
    root,
    connector: str,
    seed: int,
    test: float,
    colour: float,
    blind: float,
    tokens: float,
    backbones: dict | None = None,
):
    """A finished run's results.json with the fields the report reads (numbers chosen for a hand computation)."""
    d = root / f"{connector}-s{seed}"
    d.mkdir(parents=True)

    def acc(em, colour):
        return {"exact_match": em, "per_type": {"colour": colour}}

    results = {
        "config": {
            "encoder": {"name": "clip"},
            "connector": {"name": connector},
            "llm": {"name": "tinyllama"},
            "recipe": "mini",
            "seed": seed,
        },
        "metrics": {
            "test": {"accuracy": acc(test, colour), "blind": acc(blind, 0.1)},
            "compositional": {"accuracy": acc(test / 2, colour), "blind": acc(blind, 0.1)},
        },
        "visual_tokens_per_image": {"mean": tokens},
        "parameters": {"trainable": 1000},
        "train_samples_per_second": 10.0 + seed,
        "backbones": backbones,
    }
    (d / "results.json").write_text(json.dumps(results))


def test_report_mean_and_std_over_two_seeds_by_hand(tmp_path):
    """Two seeds of mlp2x_gelu (test 0.50, 0.70) and of linear (0.40, 0.40): mean 60.0 and sample std
    sqrt(((50-60)^2 + (70-60)^2) / (2-1)) = 14.1; 40.0 ± 0.0; the blind row (0.30 in all four runs) 30.0 ± 0.0;
    the best test accuracy (60.0) in bold, the fewest tokens (16.0, linear's) in bold."""
    fake_run(tmp_path / "runs", "mlp2x_gelu", 0, 0.50, 0.9, 0.3, 64)
    fake_run(tmp_path / "runs", "mlp2x_gelu", 1, 0.70, 0.7, 0.3, 64)
    fake_run(tmp_path / "runs", "linear", 0, 0.40, 0.2, 0.3, 16)
    fake_run(tmp_path / "runs", "linear", 1, 0.40, 0.4, 0.3, 16)
    proc = bench(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "report" / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]

    def split(line):
        return [c.strip() for c in line.strip("|").split("|")]

    rows = {cells[0]: dict(zip(header, cells)) for cells in (split(line) for line in lines[2:] if line[:1] == "|")}
    mlp, lin = rows["clip + mlp2x_gelu + tinyllama (mini)"], rows["clip + linear + tinyllama (mini)"]
    blind = rows["blind baseline: tinyllama without the image"]
    assert mlp["seeds"] == lin["seeds"] == "2" and blind["seeds"] == "2"  # two distinct seeds
    assert mlp["test acc"] == "**60.0 ± 14.1**" and lin["test acc"] == "40.0 ± 0.0"
    assert (
        mlp["comp. acc"] == "**30.0 ± 7.1**" and mlp["colour"] == "**80.0 ± 14.1**" and lin["colour"] == "30.0 ± 14.1"
    )
    assert blind["test acc"] == "30.0 ± 0.0" and blind["colour"] == "10.0 ± 0.0"
    assert lin["tokens/img"] == "**16.0 ± 0.0**" and mlp["tokens/img"] == "64.0 ± 0.0"
    assert mlp["train samples/s"] == lin["train samples/s"] == "**10.5 ± 0.7**"
    csv_rows = (tmp_path / "report" / "table.csv").read_text().splitlines()
    assert any(r.startswith("clip + mlp2x_gelu + tinyllama (mini),2,0.6,0.3,0.8") for r in csv_rows), csv_rows


def test_mcnemar_exact_by_hand():
    from bench.evaluate.stats import mcnemar_exact, paired_bootstrap

    # b = 1, c = 9: P[Binomial(10, 1/2) <= 1] = (1 + 10) / 1024, two-sided 22 / 1024
    assert mcnemar_exact(1, 9) == mcnemar_exact(9, 1) == 22 / 1024
    assert mcnemar_exact(0, 6) == 2 / 64 and mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    low, high = paired_bootstrap([0] * 50)
    assert low == high == 0.0
    low, high = paired_bootstrap([-1] * 30 + [0] * 70)  # mean -0.3, binomial sd sqrt(.3 * .7 / 100) = 0.046
    assert -0.3 - 2.5 * 0.046 < low < -0.3 < high < -0.3 + 2.5 * 0.046


def paired_runs(root: Path) -> None:
    """mlp2x_gelu right on all 10 questions of seeds 0 and 1, linear wrong on the last 3 of them per seed."""
    for seed in (0, 1):
        for name, correct in (("mlp2x_gelu", [1] * 10), ("linear", [1] * 7 + [0] * 3)):
            fake_run(root, name, seed, sum(correct) / 10, 0.5, 0.3, 64)
            path = root / f"{name}-s{seed}" / "results.json"
            r = json.loads(path.read_text())
            r["metrics"]["test"]["accuracy"]["per_question"] = {"ids": [f"q{i}" for i in range(10)], "correct": correct}
            path.write_text(json.dumps(r))


def test_report_compares_each_configuration_with_the_best_paired_per_question(tmp_path):
    """mlp2x_gelu right on all 10 questions of both seeds, linear wrong on 3 of them per seed (never the other way):
    discordant b = 0, c = 6 -> McNemar p = 2 / 2^6 = 0.031, difference -30 points."""
    paired_runs(tmp_path / "runs")
    proc = bench(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "report" / "table.md").read_text()
    lin = next(line for line in table.splitlines() if line.startswith("| clip + linear"))
    mlp = next(line for line in table.splitlines() if line.startswith("| clip + mlp2x_gelu"))
    assert lin.rstrip(" |").endswith("p=0.031") and "-30.0 [" in lin and mlp.rstrip(" |").endswith("best")
    low, high = (float(x) for x in lin[lin.index("-30.0 [") + 7 : lin.index("]")].split(", "))
    assert low < -30.0 < high < 0
    assert "McNemar" in table


def test_a_tiled_and_an_untiled_run_of_the_same_components_are_two_configurations(tmp_path):
    """The resolution sweep (issue 38) keeps no tiling and AnyRes in two directories whose cells have the same names;
    read together, linear tiled (test 0.8) and linear untiled (0.4) are two rows, not one row of mean 0.6."""
    from bench.report.tables import aggregate, load_runs

    fake_run(tmp_path / "none", "linear", 0, 0.40, 0.2, 0.3, 64)
    fake_run(tmp_path / "anyres", "linear", 0, 0.80, 0.2, 0.3, 664)
    path = tmp_path / "anyres" / "linear-s0" / "results.json"
    tiled = json.loads(path.read_text())
    tiled["config"]["tiling"] = {"name": "anyres", "grid_pinpoints": [[192, 192]], "max_tiles": 4}
    path.write_text(json.dumps(tiled))
    rows = {r["name"]: r for r in aggregate(load_runs([tmp_path]))}
    assert rows["clip + linear + tinyllama (mini)"]["test"] == (0.4, 0.0)
    assert rows["clip + linear + tinyllama (mini, anyres 192x192 max 4)"]["test"] == (0.8, 0.0)


def test_runs_of_one_name_with_other_data_or_stages_are_other_configurations(tmp_path):
    """Runs whose names agree but whose settings differ where the name does not show them are rows of their own,
    labelled with what differs (the group at the defaults keeps the plain name); the same settings written two ways (a
    recipe, and its stages written out as a config file writes them) are one row of two seeds; and one configuration
    with one seed recorded twice is an error, not a silently double-counted or dropped run."""
    import pytest

    from bench.report.tables import aggregate, load_runs, per_question

    def run(folder: str, seed: int, test: float, correct: list[int], **config):
        fake_run(tmp_path / folder, "mlp2x_gelu", seed, test, 0.5, 0.3, 64)
        path = tmp_path / folder / f"mlp2x_gelu-s{seed}" / "results.json"
        r = json.loads(path.read_text())
        r["config"] |= config
        r["stages"] = written_out  # the stages as trained, as every record since December 7 holds them
        r["metrics"]["test"]["accuracy"]["per_question"] = {"ids": [f"q{i}" for i in range(4)], "correct": correct}
        path.write_text(json.dumps(r))
        return path

    world = {"kind": "world", "pretrain": {"llm_level": "smollm2"}}
    written_out = [
        {"stage": 1, "steps": 300, "batch_size": 32, "lr": 2e-3, "connector_lr": "paper", "warmup_ratio": 0.05},
        {"stage": 2, "steps": 1200, "batch_size": 32, "lr": 2e-3, "connector_lr": "paper", "warmup_ratio": 0.05},
    ]
    run("a", 0, 0.50, [1, 1, 0, 0], data=world)
    second = run("b", 1, 0.75, [1, 1, 1, 0], data=world, stages=written_out)  # `mini` written out, another seed
    run("c", 0, 1.00, [1, 1, 1, 1], data={**world, "pretrain": {**world["pretrain"], "encoder_px": 32}})
    runs = load_runs([tmp_path])
    rows = {r["name"]: r for r in aggregate(runs)}
    plain, px32 = (
        "clip + mlp2x_gelu + tinyllama (mini)",
        "clip + mlp2x_gelu + tinyllama (mini; data.pretrain.encoder_px=32)",
    )
    assert rows[plain]["seeds"] == [0, 1] and rows[plain]["test"] == (0.625, statistics.stdev([0.5, 0.75]))
    assert rows[px32]["seeds"] == [0] and rows[px32]["test"] == (1.0, 0.0)
    assert per_question(runs, plain) == {(0, "q0"): 1, (0, "q1"): 1, (0, "q2"): 0, (0, "q3"): 0} | {
        (1, "q0"): 1,
        (1, "q1"): 1,
        (1, "q2"): 1,
        (1, "q3"): 0,
    }
    assert per_question(runs, px32) == {(0, f"q{i}"): 1 for i in range(4)}
    twice = json.loads(second.read_text())
    twice["config"]["seed"] = 0
    second.write_text(json.dumps(twice))  # now seed 0 of the plain configuration twice
    with pytest.raises(ValueError, match=r"\(mini\): seed 0 is recorded by 2 runs"):
        load_runs([tmp_path])
    twice["config"]["seed"] = 1
    second.write_text(json.dumps(twice))
    # a record from before records held their stages as trained, of another world encoder side: the labels compare
    # every group alike (stages as configured), so the others keep their labels and gain no spurious stages one
    old = run("d", 0, 0.25, [1, 0, 0, 0], data={**world, "pretrain": {**world["pretrain"], "encoder_px": 48}})
    record = json.loads(old.read_text())
    del record["stages"]
    old.write_text(json.dumps(record))
    names = {r["name"] for r in aggregate(load_runs([tmp_path])) if not r["name"].startswith("blind")}
    assert names == {plain, px32, "clip + mlp2x_gelu + tinyllama (mini; data.pretrain.encoder_px=48)"}


def test_gzipped_records_count_once_and_a_recorded_cell_is_not_rerun(tmp_path, monkeypatch):
    """A sweep kept in the repository as results.json.gz: the report reads it like results.json, a directory holding
    both counts once, and `bench sweep` skips a cell whose record is there instead of training it again, but only if
    the record was trained on the backbones this code builds: a record of the same cell name made with another world
    encoder (or one from before backbones were recorded) is moved aside, kept, and the cell runs again."""
    import gzip
    import shutil

    import bench.report.sweep as sweep_module
    from bench.report.sweep import cell_name, sweep
    from bench.report.tables import aggregate, load_runs
    from bench.train.pretrain import world_backbones
    from bench.train.settings import RunConfig

    now = world_backbones(RunConfig(encoder={"name": "clip"}, llm={"name": "tinyllama"}))
    assert now["encoder"].startswith("encoder-clip-") and now["llm"].startswith("llm-tinyllama-")
    fake_run(tmp_path / "runs", "linear", 0, 0.40, 0.2, 0.3, 16, backbones=now)
    fake_run(tmp_path / "runs", "linear", 1, 0.60, 0.2, 0.3, 16, backbones=now)
    record = tmp_path / "record"
    for d in (tmp_path / "runs").iterdir():
        (record / d.name).mkdir(parents=True)
        (record / d.name / "results.json.gz").write_bytes(gzip.compress((d / "results.json").read_bytes()))
    shutil.copy(tmp_path / "runs" / "linear-s0" / "results.json", record / "linear-s0")  # both files in one cell
    assert len(load_runs([record])) == 2
    assert aggregate(load_runs([record])) == aggregate(load_runs([tmp_path / "runs"]))
    cell = tmp_path / "sweep" / cell_name("clip", {"name": "linear"}, "tinyllama", 0)
    cell.mkdir(parents=True)
    shutil.copy(record / "linear-s0" / "results.json.gz", cell)
    said: list[str] = []
    sweep(tmp_path / "sweep", ["clip"], ["linear"], ["tinyllama"], [0], base={}, log=said.append)
    assert said == [f"[1/1] {cell.name}: finished, skipped"]
    ran: list[Path] = []
    monkeypatch.setattr(sweep_module, "run", lambda cfg, cell, **kw: ran.append(cell))
    record = json.loads(gzip.decompress((cell / "results.json.gz").read_bytes()))
    shutil.rmtree(cell)
    for other in ({**now, "encoder": "encoder-clip-s240-b256-seed0"}, None):  # an older recipe; nothing recorded
        cell.mkdir()
        (cell / "results.json.gz").write_bytes(gzip.compress(json.dumps({**record, "backbones": other}).encode()))
        said.clear()
        sweep(tmp_path / "sweep", ["clip"], ["linear"], ["tinyllama"], [0], base={}, log=said.append)
        assert ran[-1] == cell and not cell.exists() and "recorded with other backbones" in said[0], said
        kept = sorted((tmp_path / "sweep.superseded").iterdir())[-1]
        assert json.loads(gzip.decompress((kept / "results.json.gz").read_bytes()))["backbones"] == other
    assert len(ran) == 2 and len(list((tmp_path / "sweep.superseded").iterdir())) == 2


def test_a_recorded_cell_with_other_settings_is_moved_aside_and_run_again(tmp_path, monkeypatch):
    """A cell's name says its components and seed, not its recipe or data options: a record of the same name made
    with another recipe, or with or without ``qa_turns``, is not this sweep's cell even on the same backbones. It is
    moved aside and the cell runs again; a record whose settings match is skipped."""
    import bench.report.sweep as sweep_module
    from bench.report.sweep import cell_name, sweep
    from bench.train.pretrain import world_backbones
    from bench.train.settings import RunConfig

    now = world_backbones(RunConfig(encoder={"name": "clip"}, llm={"name": "tinyllama"}))
    fake_run(tmp_path / "runs", "linear", 0, 0.40, 0.2, 0.3, 16, backbones=now)
    record = json.loads((tmp_path / "runs" / "linear-s0" / "results.json").read_text())
    cell = tmp_path / "sweep" / cell_name("clip", {"name": "linear"}, "tinyllama", 0)
    ran: list[Path] = []
    monkeypatch.setattr(sweep_module, "run", lambda cfg, cell, **kw: ran.append(cell))
    turns = {"kind": "world", "qa_turns": 3}
    cases = [
        ({}, {}, False),
        ({"recipe": "mini-wide"}, {}, True),
        ({"data": turns}, {}, True),
        ({}, {"data": turns}, True),
        ({"data": turns}, {"data": turns}, False),
    ]
    for recorded, base, runs_again in cases:
        cell.mkdir(parents=True, exist_ok=True)
        config = {**record["config"], **recorded}
        (cell / "results.json").write_text(json.dumps({**record, "config": config}))
        said: list[str] = []
        before = len(ran)
        sweep(tmp_path / "sweep", ["clip"], ["linear"], ["tinyllama"], [0], base=base, log=said.append)
        assert (len(ran) > before) == runs_again, (recorded, base, said)
        if runs_again:
            assert "recorded with other settings" in said[0] and not cell.exists(), said
        else:
            assert said == [f"[1/1] {cell.name}: finished, skipped"]
    assert len(list((tmp_path / "sweep.superseded").iterdir())) == 3


def test_a_sweep_under_another_recipe_sits_beside_the_default_recipes_cells(tmp_path, monkeypatch):
    """``bench sweep --recipe R`` (R not the level's default) names its cells ``...--s0--R``: the default recipe's
    record of the same components and seed in that folder stays where it is and counts for the default recipe, and R's
    cell runs beside it. A cell of the plain name recorded under R (as sweeps named them before) still counts as R's."""
    import bench.report.sweep as sweep_module
    from bench.report.sweep import cell_name, sweep
    from bench.train.pretrain import world_backbones
    from bench.train.settings import RunConfig

    now = world_backbones(RunConfig(encoder={"name": "clip"}, llm={"name": "tinyllama"}))
    fake_run(tmp_path / "runs", "linear", 0, 0.40, 0.2, 0.3, 16, backbones=now)
    record = json.loads((tmp_path / "runs" / "linear-s0" / "results.json").read_text())
    out = tmp_path / "sweep"
    plain = out / cell_name("clip", {"name": "linear"}, "tinyllama", 0)
    plain.mkdir(parents=True)
    (plain / "results.json").write_text(json.dumps(record))  # the default recipe, `mini`
    ran: list[Path] = []
    monkeypatch.setattr(sweep_module, "run", lambda cfg, cell, **kw: ran.append(cell) or cell.mkdir(parents=True))
    said: list[str] = []
    rates = {"recipe": "mini-paper-rates"}
    sweep(out, ["clip"], ["linear"], ["tinyllama"], [0], base=rates, log=said.append, recipe_in_name=True)
    assert ran == [out / "clip--linear--tinyllama--s0--mini-paper-rates"], said
    assert json.loads((plain / "results.json").read_text()) == record  # untouched
    assert not (tmp_path / "sweep.superseded").exists()
    said.clear()
    sweep(out, ["clip"], ["linear"], ["tinyllama"], [0], base={}, log=said.append)
    assert said == [f"[1/1] {plain.name}: finished, skipped"]
    # an earlier sweep's cell of the plain name, recorded under the other recipe: found and skipped
    ran[-1].rmdir()
    (plain / "results.json").write_text(json.dumps({**record, "config": {**record["config"], **rates}}))
    said.clear()
    sweep(out, ["clip"], ["linear"], ["tinyllama"], [0], base=rates, log=said.append, recipe_in_name=True)
    assert said == [f"[1/1] {plain.name}: finished, skipped"] and len(ran) == 1


def test_an_unfinished_cell_started_with_other_settings_starts_afresh(tmp_path, monkeypatch):
    """A killed sweep's unfinished cell resumes from its own config.json, so it is resumed only when that config is
    this sweep's cell; one started with other settings (here 3 questions a sample where the sweep now asks 7) moves
    aside and the cell runs afresh with the sweep's settings; so does one started on other backbones than this code
    builds for the cell (its backbones.json), or that did not record them."""
    import dataclasses

    import bench.report.sweep as sweep_module
    from bench.report.sweep import cell_name, sweep
    from bench.run.job import BACKBONES_NAME
    from bench.train.pretrain import world_backbones
    from bench.train.settings import RunConfig

    calls: list[tuple[Path, bool]] = []
    monkeypatch.setattr(sweep_module, "run", lambda cfg, cell, resume, **kw: calls.append((cell, resume)))
    cell = tmp_path / "sweep" / cell_name("clip", {"name": "linear"}, "tinyllama", 0)
    base = {"recipe": "mini-smollm2", "data": {"kind": "world", "qa_turns": 7}}
    cfg = RunConfig(encoder={"name": "clip"}, connector={"name": "linear"}, llm={"name": "tinyllama"}, seed=0)
    builds = world_backbones(RunConfig(**{**dataclasses.asdict(cfg), **base}))
    other = {**builds, "llm": builds["llm"] + "-older-recipe"}
    cases = (  # the settings and backbones the cell started with, whether it resumes, why it does not
        ({"kind": "world", "qa_turns": 3}, builds, False, "started with other settings (data)"),
        (base["data"], other, False, "started on other backbones"),
        (base["data"], None, False, "started on other backbones (not recorded"),
        (base["data"], builds, True, None),
    )
    for n, (started, backbones, resumed, why) in enumerate(cases, start=1):
        cell.mkdir(parents=True, exist_ok=True)
        config = {**dataclasses.asdict(cfg), "recipe": "mini-smollm2", "data": started}
        (cell / "config.json").write_text(json.dumps(config))
        if backbones is not None:
            (cell / BACKBONES_NAME).write_text(json.dumps(backbones))
        said: list[str] = []
        sweep(tmp_path / "sweep", ["clip"], ["linear"], ["tinyllama"], [0], base=base, log=said.append)
        assert calls[-1] == (cell, resumed), said
        assert cell.exists() == resumed
        if not resumed:
            assert why in said[0], said
            moved = tmp_path / "sweep.superseded" / (cell.name + (f".{n}" if n > 1 else "")) / "config.json"
            assert json.loads(moved.read_text())["data"] == started


def test_sweep_cells_get_the_data_options_bench_run_would_write(monkeypatch):
    """`bench sweep --qa-turns 3 --world-llm wide` hands each cell the same ``data`` as `bench run` with those flags
    (plus the world it is drawn from), and with no data option no ``data`` at all: the recorded cells stay valid."""
    import dataclasses

    import bench.report.sweep as sweep_module
    from bench.cli import COMMANDS
    from bench.cli.common import data_from_args
    from bench.cli.parser import build_parser
    from bench.data.world import WorldConfig

    seen: list[dict] = []
    monkeypatch.setattr(sweep_module, "sweep", lambda out, *grid, **launcher: seen.append(grid[-1]) or [])
    monkeypatch.setattr("bench.cli.training.report", lambda cells, out: None)
    parser = build_parser(COMMANDS)
    for flags in ([], ["--qa-turns", "3", "--world-llm", "wide"], ["--world-scale", "0.5"]):
        args = parser.parse_args(["sweep", "--connector", "linear", *flags])
        args.func(args)
        run_args = parser.parse_args(["run", "--connector", "linear", *flags])
        want = {"world": WorldConfig().as_dict(), **data_from_args(run_args)} if flags else None
        assert seen[-1].get("data") == want, flags
        # the world as recorded before later settings existed (they are left out at their defaults)
        assert not flags or set(seen[-1]["data"]["world"]) == set(dataclasses.asdict(WorldConfig())) - {"object_scale"}
    assert seen[-2]["data"]["qa_turns"] == 3 and seen[-2]["data"]["pretrain"] == {"llm_level": "wide"}


def test_sweep_pairs_script_compares_two_configurations_by_hand(tmp_path):
    """benchmarks/sweep_pairs.py on the runs above: linear - mlp2x_gelu = -30 points over 20 (seed, question) pairs,
    McNemar p = 2 / 2^6 = 0.031; a name that matches no configuration is refused with the list of those there are."""
    import subprocess
    import sys

    paired_runs(tmp_path / "runs")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_pairs.py"

    def run(*a):
        return subprocess.run(
            [sys.executable, str(script), str(tmp_path / "runs"), *a],
            capture_output=True,
            text=True,
        )

    ok = run("linear:mlp2x_gelu", "mlp2x_gelu:linear")
    assert ok.returncode == 0, ok.stderr
    first, second = ok.stdout.splitlines()
    assert first.startswith("linear:mlp2x_gelu: -30.0 [")
    assert first.endswith("McNemar p=0.031, 20 (seed, question) pairs")
    assert second.startswith("mlp2x_gelu:linear: +30.0 [")
    bad = run("qformer:linear")
    assert bad.returncode != 0 and "'qformer' names 0 configurations" in bad.stderr and "clip + linear" in bad.stderr


def test_a_split_with_no_usable_question_reads_not_evaluated_in_every_table(tmp_path):
    """Issue 34: a run whose compositional split kept no question (no ``accuracy`` recorded) shows "not evaluated"
    in Markdown, CSV and the HTML page, not an empty cell and never a number; a configuration with one measured seed
    keeps the measured value."""
    from bench.report.html import table_context
    from bench.report.tables import aggregate, load_runs, table

    fake_run(tmp_path / "runs", "mlp2x_gelu", 0, 0.50, 0.9, 0.3, 64)
    fake_run(tmp_path / "runs", "linear", 0, 0.40, 0.2, 0.3, 16)
    record = tmp_path / "runs" / "linear-s0" / "results.json"
    results = json.loads(record.read_text())
    results["metrics"]["compositional"] = {"caption_loss": None, "perplexity": None}  # every question dropped
    record.write_text(json.dumps(results))
    rows = aggregate(load_runs([tmp_path / "runs"]))
    lin = next(r for r in rows if r["name"].startswith("clip + linear"))
    mlp = next(r for r in rows if r["name"].startswith("clip + mlp2x_gelu"))
    assert "compositional" not in lin and lin["not_evaluated"] == ["compositional"]
    assert mlp["not_evaluated"] == [] and mlp["compositional"] == (0.25, 0.0)
    md = table(rows).splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    line = next(x for x in md if x.startswith("| clip + linear"))
    assert dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))["comp. acc"] == "not evaluated"
    assert "not evaluated" in next(x for x in table(rows, "csv").splitlines() if x.startswith("clip + linear"))
    html_row = next(r for r in table_context(rows)["rows"] if r["cells"][0]["text"].startswith("clip + linear"))
    assert "not evaluated" in [c["text"] for c in html_row["cells"]]


def test_a_world_setting_added_later_at_its_default_is_the_recorded_world():
    """A cell recorded before ``object_scale`` existed (its world written without it) is the same cell as one asked
    for now at the default; at another scale it is not."""
    import dataclasses

    from bench.data.world import WorldConfig
    from bench.report.sweep import other_settings
    from bench.train.settings import RunConfig

    old_world = {k: v for k, v in dataclasses.asdict(WorldConfig()).items() if k != "object_scale"}
    record = {"config": json.loads(json.dumps({"data": {"kind": "world", "world": old_world, "qa_turns": 3}}))}
    now = RunConfig(data={"kind": "world", "world": WorldConfig().as_dict(), "qa_turns": 3})
    assert other_settings(record, now) == []
    explicit = RunConfig(data={"kind": "world", "world": {**old_world, "object_scale": 1.0}, "qa_turns": 3})
    assert other_settings(record, explicit) == []
    scaled = RunConfig(data={"kind": "world", "world": WorldConfig(object_scale=0.5).as_dict(), "qa_turns": 3})
    assert other_settings(record, scaled) == ["data"]
    # a `bench run` record names no world (the default one); a sweep cell spells the default world out
    plain_run = {"config": {"data": {"kind": "world", "qa_turns": 3}}}
    assert other_settings(plain_run, now) == [] and other_settings(plain_run, scaled) == ["data"]


def test_a_record_of_a_recipe_whose_stages_changed_is_another_cell():
    """A record names its recipe; since December 7 it also writes out the stages it trained. A recipe whose steps or
    rates changed since is another cell (the record must not count as finished), a stage setting added later at its
    default is not, and the validation-loss sample count (LOGGED_ONLY: neither the weights nor the report see it) is
    not either."""
    import dataclasses

    from bench.report.sweep import other_settings
    from bench.train.recipes import RECIPES
    from bench.train.settings import RunConfig

    cfg = RunConfig(recipe="mini-smollm2")
    trained = json.loads(json.dumps([dataclasses.asdict(s) for s in cfg.resolved_stages()]))
    record = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "stages": trained}
    assert other_settings(record, cfg) == []
    older = [{k: v for k, v in st.items() if k != "val_limit"} for st in trained]  # written before val_limit existed
    assert other_settings({**record, "stages": older}, cfg) == []
    assert other_settings({**record, "stages": [{**st, "val_limit": 7} for st in trained]}, cfg) == []
    fewer = [{**trained[0], "steps": trained[0]["steps"] - 50}, trained[1]]
    assert other_settings({**record, "stages": fewer}, cfg) == ["stages"]
    slower = [trained[0], {**trained[1], "lr": trained[1]["lr"] / 2}]
    assert other_settings({**record, "stages": slower}, cfg) == ["stages"]
    # a record from before the stages were written out compares by the recipe's name, as before
    assert other_settings({"config": record["config"]}, cfg) == []
    assert other_settings({"config": record["config"]}, RunConfig(recipe="mini")) == ["recipe"]
    # explicit stages in the config compare the same way
    explicit = RunConfig(stages=[dict(s) for s in RECIPES["mini-smollm2"]])
    as_recorded = json.loads(json.dumps(dataclasses.asdict(explicit)))
    as_recorded["stages"] = [{k: v for k, v in st.items() if k != "val_limit"} for st in as_recorded["stages"]]
    assert other_settings({"config": as_recorded}, explicit) == []
    # a run whose configuration file wrote the recipe's stages out (with checkpoints at other intervals) is the
    # recipe's cell; the same file with one stage shorter is not
    file_run = {**as_recorded, "recipe": "mini-smollm2"}
    file_run["stages"] = [{**st, "save_every": 50} for st in as_recorded["stages"]]
    assert other_settings({"config": file_run, "stages": [{**st, "save_every": 50} for st in trained]}, cfg) == []
    assert other_settings({"config": file_run, "stages": fewer}, cfg) == ["stages"]


def test_bench_sweep_names_cells_by_recipe_only_off_the_levels_default(monkeypatch):
    """The command puts the recipe in the cells' names when it is not the level's default (``mini``;
    ``mini-smollm2`` with ``--world-llm smollm2``), and only then, so that default sweeps keep their cells' names."""
    import bench.report.sweep as sweep_module
    from bench.cli import COMMANDS
    from bench.cli.parser import build_parser

    seen = []
    monkeypatch.setattr(sweep_module, "sweep", lambda *a, **kw: seen.append(kw["recipe_in_name"]) or [])
    monkeypatch.setattr("bench.cli.training.report", lambda cells, out: None)
    parser = build_parser(COMMANDS)
    for flags in (
        [],
        ["--recipe", "mini-paper-rates"],
        ["--world-llm", "smollm2"],
        ["--world-llm", "smollm2", "--recipe", "mini-smollm2-paper-rates"],
        ["--world-llm", "smollm2", "--recipe", "mini"],
    ):
        args = parser.parse_args(["sweep", "--connector", "linear", "--out", "sweeps/x", *flags])
        args.func(args)
    assert seen == [False, True, False, True, True]
