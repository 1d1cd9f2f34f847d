"""The harness on a micro world (seconds): a full run, its record, resume after a kill, and 2 processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO, SUITE_CACHE, bench, computed
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # whole CLI runs in subprocesses, one of them with 2 processes


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "micro"
    proc = bench([*MICRO, "--out", str(out), "--save-every", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_a_run_writes_its_record(micro_run):
    out, proc = micro_run
    results = json.loads((out / "results.json").read_text())
    assert {"test", "compositional"} <= set(results["metrics"])
    test = results["metrics"]["test"]
    assert 0 <= test["accuracy"]["exact_match"] <= 1 and 0 <= test["blind"]["exact_match"] <= 1
    # the 8 questions evaluated are the first 8 of the world's test split: their types are the per-type keys
    from bench.data.world import World, WorldConfig

    world = World(WorldConfig(**results["config"]["data"]["world"]), progress=False)
    first = [qa for r in world.records("test") for qa in r["qa"]][:8]
    assert set(test["accuracy"]["per_type"]) == {qa["type"] for qa in first} and test["accuracy"]["count"] == 8
    assert [e["question"] for e in test["examples"]] == [qa["question"] for qa in first[:5]]
    assert [e["truth"] for e in test["examples"]] == [qa["answer"] for qa in first[:5]]
    assert test["caption_loss"] > 0 and len(test["examples"]) > 0
    assert results["visual_tokens_per_image"] == {"mean": 64.0, "min": 64, "max": 64}
    assert results["parameters"]["trainable"] > results["parameters"]["connector"]  # stage 2 trains the LLM too
    assert 0 <= results["encoder_forwards"] <= 200 + 10 + 10 + 8 and results["skipped_samples"] == []
    assert results["git_commit"] and results["versions"]["torch"]
    # the backbones it names are the directories the run loaded (vlm_config.json holds their paths)
    specs = json.loads((out / "vlm_config.json").read_text())
    assert results["backbones"] == {
        "world": world.cfg.key(),
        "encoder": Path(specs["encoder"]["checkpoint"]).name,
        "llm": Path(specs["llm"]["checkpoint"]).name,
    }
    assert Path(specs["encoder"]["checkpoint"]).parent.parent == world.dir
    # and what they were byte for byte: each directory's manifest (every file's SHA-256), digested
    import hashlib

    manifests = {k: Path(specs[k]["checkpoint"]) / "manifest.json" for k in ("encoder", "llm")}
    want = {k: hashlib.sha256(m.read_bytes()).hexdigest()[:16] for k, m in manifests.items()}
    assert results["backbone_bytes"] == want and want["encoder"] != want["llm"]
    assert '"model.safetensors"' in manifests["encoder"].read_text()
    # the machine it ran on, read independently of the code that records it
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    said = {k.strip(): v.strip() for k, _, v in reversed([line.partition(":") for line in cpuinfo])}  # the first
    machine = results["machine"]
    assert "model name" not in said or machine["cpu"] == said["model name"]
    for flag in ("amx_bf16", "avx512_bf16", "avx2"):
        assert (flag in machine["isa"]) == (flag in said.get("flags", "").split())
    assert machine["threads"] == torch.get_num_threads()
    assert (machine["cuda"] is None) == (not torch.cuda.is_available())
    assert [len(h) for h in results["loss_history"]] == [6, 6]
    # where its wall time went, part by part (the summary lists them in the order the run spent them)
    seconds = results["seconds"]
    assert set(seconds) == {
        "setup",
        "blind",
        "stage1",
        "stage2",
        "save",
        "evaluate test",
        "evaluate compositional",
        "profile",
        "visual tokens",
    }
    assert all(v >= 0 for v in seconds.values()) and sum(seconds.values()) <= results["wall_time_seconds"] + 0.5
    assert "of it: setup " in proc.stdout and "stage2 " in proc.stdout.split("of it: setup ")[1]
    # measured efficiency: mlp2x_gelu from the 64-wide world encoder to the 128-wide world LLM, 64 tokens
    eff = results["efficiency"]
    assert eff["flops"]["connector"] == 2 * 64 * 64 * 128 + 2 * 64 * 128 * 128
    assert eff["flops"]["llm_prefill"] > 0 and eff["prefill_latency_ms"] > 0 and eff["decode_tokens_per_second"] > 0
    for name in (
        "config.json",
        "vlm_config.json",
        "trainable.safetensors",
        "summary.txt",
        "stage1/checkpoint-last/trainable.safetensors",
        "stage2/checkpoint-best/optimizer.pt",
    ):
        assert (out / name).exists(), name
    assert "accuracy" in proc.stdout and "blind" in proc.stdout


def test_blind_answers_are_the_base_llm_reading_the_question_alone(micro_run):
    """The blind baseline, recomputed independently: the world's pretrained LLM as saved (before this run trained
    anything), loaded with transformers' own classes, greedy on the question text without the image."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = micro_run
    results = json.loads((out / "results.json").read_text())
    (base,) = Path(os.environ["CONNECTOR_ZOO_CACHE"]).glob("world/*/backbones/llm-tinyllama-s3-*")
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
    examples = results["metrics"]["test"]["examples"]
    for e in examples:
        text = tok.apply_chat_template(
            [{"role": "user", "content": e["question"]}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            new = model.generate(
                ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id
            )[0, ids.shape[1] :]
        assert tok.decode(new, skip_special_tokens=True).strip() == e["blind"], e
    # and not the trained model: its answers to the same questions are the run's own, recorded next to them
    assert [e["answer"] for e in examples] != [e["blind"] for e in examples] or results["training"][-1]["steps"] == 0


def test_eval_and_generate_work_on_the_run_directory(micro_run, tmp_path):
    out, _ = micro_run
    proc = bench(["eval", str(out), "--eval-limit", "8"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test: accuracy" in proc.stdout and "compositional: caption_loss" in proc.stdout
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    proc = bench(
        [
            "generate",
            str(out),
            "--image",
            str(tmp_path / "red.png"),
            "--prompt",
            "What colour is the circle?",
            "--max-new-tokens",
            "3",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = bench(["generate", str(out), "--image", str(tmp_path / "none.png"), "--prompt", "x"])
    assert proc.returncode == 2 and "cannot read image" in proc.stderr


def test_a_killed_run_resumes_to_the_same_numbers(micro_run, tmp_path):
    out, _ = micro_run
    killed = tmp_path / "killed"
    proc = bench([*MICRO, "--out", str(killed), "--save-every", "2"], env={"CONNECTOR_ZOO_KILL_AT": "step:1:5"})
    assert proc.returncode != 0  # SIGKILL at step 5 of stage 1
    assert not (killed / "results.json").exists()
    state = json.loads((killed / "stage1" / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the last complete checkpoint; nothing half-written under a real name
    assert not [p for p in (killed / "stage1").iterdir() if not p.name.startswith("checkpoint-")]
    # the backbones it started on are kept from the start; a copy told it started on others does not resume
    started = json.loads((killed / "backbones.json").read_text())
    assert started == json.loads((out / "results.json").read_text())["backbones"]
    other = tmp_path / "other-backbones"
    shutil.copytree(killed, other)
    (other / "backbones.json").write_text(json.dumps({**started, "llm": started["llm"] + "-older"}))
    proc = bench(["run", "--resume", str(other)])
    assert proc.returncode != 0 and "started on the backbones" in proc.stderr, proc.stderr[-2000:]
    assert not (other / "results.json").exists()
    proc = bench(["run", "--resume", str(killed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 4/6" in proc.stdout
    a = json.loads((out / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert computed(b["loss_history"]) == computed(a["loss_history"])
    assert b["encoder_forwards"] == 0  # every image's features came from the cache
    assert b["metrics"]["test"]["accuracy"] == a["metrics"]["test"]["accuracy"]
    wa, wb = load_file(str(out / "trainable.safetensors")), load_file(str(killed / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_two_processes_match_one_with_twice_the_accumulation(micro_run, tmp_path):
    common = [*MICRO, "--steps", "4", "--eval-limit", "2"]
    one = bench([*common, "--out", str(tmp_path / "one"), "--batch-size", "2", "--grad-accum", "2"])
    assert one.returncode == 0, one.stderr[-3000:]
    # two CPU processes over gloo: torchrun sets the ranks, accelerate's Accelerator(cpu=True) joins them
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    two = bench([*common, "--out", str(tmp_path / "two"), "--batch-size", "2", "--grad-accum", "1"], launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())["loss_history"]
    b = json.loads((tmp_path / "two" / "results.json").read_text())["loss_history"]
    for stage_a, stage_b in zip(a, b):
        for x, y in zip(stage_a, stage_b):
            assert abs(x["loss"] - y["loss"]) <= 1e-4 * max(1.0, abs(x["loss"])), (x, y)
    wa = load_file(str(tmp_path / "one" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "two" / "trainable.safetensors"))
    assert all((wa[k] - wb[k]).abs().max() < 1e-4 for k in wa)


def test_pruning_curve_at_100_percent_equals_the_unpruned_model(micro_run):
    from bench.evaluate.prune_curve import pruning_curve

    out, _ = micro_run
    rows = pruning_curve(out, [1.0, 0.5, 0.25], eval_limit=8, seeds=(0, 1))
    by = {(r["method"], r["keep_ratio"]): r for r in rows}
    # keeping every token gives exactly the unpruned model's answers, not merely the same score
    for method in ("cls_prune", "random_keep", "avgpool", "fastv"):  # fastv at R = 0: nothing dropped in the LLM
        full = by[(method, 1.0)]
        assert full["answers"] == full["unpruned_answers"] and full["accuracy"] == full["unpruned_accuracy"], method
    assert [by[("cls_prune", r)]["tokens"] for r in (1.0, 0.5, 0.25)] == [64.0, 32.0, 16.0]
    assert [by[("random_keep", r)]["tokens"] for r in (1.0, 0.5, 0.25)] == [64.0, 32.0, 16.0]
    assert [by[("avgpool", r)]["tokens"] for r in (1.0, 0.5, 0.25)] == [64.0, 36.0, 16.0]  # 8x8, 6x6, 4x4
    assert by[("random_keep", 0.5)]["draws"] == 2 and "speedup" in by[("cls_prune", 0.5)]
    # per draw, each question's exact match, the same questions named in every row: the accuracy is their mean
    assert len({r["questions"] for r in rows}) == 1 and rows[0]["questions"].startswith("8:")
    for r in rows:
        assert len(r["correct"]) == r["draws"] and all(len(c) == 8 and set(c) <= {"0", "1"} for c in r["correct"])
        mean = sum(c.count("1") for c in r["correct"]) / (8 * r["draws"])
        assert abs(mean - r["accuracy"]) < 1e-9, r["method"]
    assert by[("cls_prune", 1.0)]["correct"] == by[("random_keep", 1.0)]["correct"][:1]
    # the other training-free reducers at the same counts: VisionZip k, PruMerge int(k) + 1, FastV k after its layer
    assert [by[("visionzip", r)]["tokens"] for r in (0.5, 0.25)] == [32.0, 16.0]
    assert [by[("prumerge", r)]["tokens"] for r in (0.5, 0.25)] == [33.0, 17.0]
    assert [by[("fastv", r)]["tokens"] for r in (0.5, 0.25)] == [32.0, 16.0]


def test_feature_cache_off_cold_and_warm_give_the_same_run(micro_run, tmp_path):
    """The same seed with the encoder online each batch, with the cache filled on the way, and read back: identical
    losses and mini-world accuracy (fp32), and the warm run encodes nothing."""

    # a feature cache of the test's own (the suite's world and presets linked in): other tests, in another worker,
    # fill the suite's at the same time, and this one deletes its own
    cache = tmp_path / "cache"
    cache.mkdir()
    for part in Path(SUITE_CACHE).iterdir():
        if part.name != "features":
            (cache / part.name).symlink_to(part)
    runs = {}
    for name in ("off", "cold", "warm"):
        out = tmp_path / name
        if name == "cold":
            assert Path(runs["off"]["feature_cache"]["dir"]).is_relative_to(cache)
            shutil.rmtree(runs["off"]["feature_cache"]["dir"], ignore_errors=True)  # "off" writes none: cold anyway
        args = [*MICRO, "--feature-cache", "off" if name == "off" else "on", "--out", str(out)]
        proc = bench(args, env={"CONNECTOR_ZOO_CACHE": str(cache)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"feature cache: {'off' if name == 'off' else 'on'} (--feature-cache" in proc.stdout
        runs[name] = json.loads((out / "results.json").read_text())
    off, cold, warm = runs["off"], runs["cold"], runs["warm"]
    assert cold["encoder_forwards"] > 0 and warm["encoder_forwards"] == 0 and cold["feature_cache"]["disk_bytes"] > 0
    assert off["encoder_forwards"] > cold["encoder_forwards"]  # online: every batch, every epoch
    # rows of 64 patches + CLS at width 64 in fp32, each counted once (4 tables share the directory), plus file blocks
    assert cold["feature_cache"]["disk_bytes"] <= cold["encoder_forwards"] * 65 * 64 * 4 + 4 * 2 * 3 * 4096
    for other in (cold, warm):
        assert computed(other["loss_history"]) == computed(off["loss_history"])
        for split in ("test", "compositional"):
            assert other["metrics"][split]["accuracy"] == off["metrics"][split]["accuracy"]
            assert other["metrics"][split]["caption_loss"] == off["metrics"][split]["caption_loss"]


def test_a_world_at_128_pixels_gives_16x16_patches(tmp_path):
    out = tmp_path / "r128"
    args = [*MICRO, "--world-resolution", "128", "--steps", "2", "--eval-limit", "2", "--out", str(out)]
    proc = bench(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["data"]["world"]["image_size"] == 128
    assert results["visual_tokens_per_image"] == {"mean": 256.0, "min": 256, "max": 256}
    bad = bench([*MICRO, "--world-resolution", "100", "--out", str(tmp_path / "bad")])
    assert bad.returncode == 2 and "multiple of 8" in bad.stderr


def test_quiet_run_prints_only_its_directory_and_logs_to_run_log(tmp_path):
    out = bench([*MICRO, "--steps", "2", "--eval-limit", "2", "--quiet", "--out", str(tmp_path / "q")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines() == [f"run directory: {tmp_path / 'q'}"]
    log = (tmp_path / "q" / "run.log").read_text().splitlines()
    assert any("stage 1 (connector)" in line for line in log) and any("test" in line for line in log)
    assert all(line[:4].isdigit() for line in log)  # time-stamped


def test_progress_bars_per_stage_and_none_under_quiet(tmp_path):
    """On the console (stderr) each training stage has a bar with its loss and samples/s; --quiet shows none."""
    shown = bench([*MICRO, "--steps", "3", "--eval-limit", "2", "--out", str(tmp_path / "a")], env={"TQDM_DISABLE": ""})
    assert shown.returncode == 0, shown.stderr[-3000:]
    for stage in (1, 2):
        assert re.search(rf"stage {stage}: +100%.*3/3.*loss \d\.\d{{4}}, \d+ samples/s", shown.stderr), shown.stderr
    quiet = bench(
        [*MICRO, "--steps", "3", "--eval-limit", "2", "--quiet", "--out", str(tmp_path / "q")], env={"TQDM_DISABLE": ""}
    )
    assert quiet.returncode == 0 and "stage 1:" not in quiet.stderr and "%|" not in quiet.stderr, quiet.stderr


def test_git_commit_says_when_tracked_code_differs_from_the_commit(tmp_path):
    """A clean checkout: its HEAD; a tracked file edited: HEAD-dirty; an untracked file does not count; no
    checkout: None."""
    import subprocess

    from bench.run.record import git_commit

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    assert git_commit(tmp_path) is None
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD").stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "-dirty"


def test_every_plain_run_setting_has_its_flag_and_arrives():
    """Issue 33: a plain setting travels from its `bench run` flag straight to the RunConfig field of the same name
    (no hand copy to forget); each one given on the command line arrives in the run's config."""
    from bench.cli import COMMANDS
    from bench.cli.parser import build_parser
    from bench.cli.training import run_config_from_args
    from bench.train.settings import RunConfig

    parser = build_parser(COMMANDS)
    run_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    dests = {a.dest for a in run_parser._actions}
    assert set(RunConfig.plain_fields()) <= dests, set(RunConfig.plain_fields()) - dests
    args = parser.parse_args(
        [
            "run",
            "--seed",
            "7",
            "--precision",
            "bf16",
            "--max-length",
            "99",
            "--num-workers",
            "0",
            "--feature-cache",
            "off",
            "--strict",
            "--max-image-pixels",
            "5",
        ]
    )
    cfg = run_config_from_args(args)
    assert (cfg.seed, cfg.precision, cfg.max_length, cfg.num_workers, cfg.feature_cache, cfg.strict) == (
        7,
        "bf16",
        99,
        0,
        "off",
        True,
    )
    assert cfg.max_image_pixels == 5
