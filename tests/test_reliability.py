"""The reliability suite: bad records, bad settings, hostile run directories, corrupt weights, leftovers of killed
writers. Each case ends in a recorded skip (id + reason) or one clear line, and nothing outside the image folder is
read. Kills during pretraining and checkpoint writes and concurrent cold-cache runs are in test_reliability_runs.py.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import BAD_RECORDS, GOOD, huge_png, turns
from PIL import Image

from bench.cli import main
from bench.data.formats import BadSample, hf_messages, llava_json
from bench.data.images import FileImages
from bench.train.assemble import load_data
from bench.train.settings import RunConfig, StageConfig
from connector_zoo.io import materialize, remove_stale_temporaries, write_manifest
from connector_zoo.model.vlm import VLM
from connector_zoo.registry import RegistryError
from connector_zoo.settings import PILLOW_MAX_IMAGE_PIXELS, SettingError
from connectors import build_connector

GOOD_RECORDS = {
    "plain": {"image": "a.png", "conversations": GOOD},
    "system_first": {"image": "a.png", "conversations": [{"from": "system", "value": "Be brief."}, *GOOD]},
    "multi_turn": {"image": "a.png", "conversations": GOOD + turns(("human", "Sure?"), ("gpt", "yes"))},
    "text_only": {"conversations": turns(("human", "Hi"), ("gpt", "Hello"))},
}


def write_corpus(root: Path) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(root / "images" / "a.png")
    records = [{"id": k, **v} for k, v in GOOD_RECORDS.items()] + [{"id": k, **v} for k, (v, _) in BAD_RECORDS.items()]
    records.append("not a record")
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json", root / "images"


def test_every_bad_record_is_skipped_with_its_id_and_reason(tmp_path):
    path, folder = write_corpus(tmp_path)
    ds = llava_json(path, folder)
    assert [s.id for s in ds.samples] == list(GOOD_RECORDS)
    reasons = {s["id"]: s["reason"] for s in ds.skipped}
    assert set(reasons) == {*BAD_RECORDS, f"#{len(GOOD_RECORDS) + len(BAD_RECORDS)}"}
    for rid, (_, says) in BAD_RECORDS.items():
        assert says in reasons[rid], (rid, reasons[rid])


def test_strict_stops_at_the_first_bad_record_with_the_same_message(tmp_path):
    path, folder = write_corpus(tmp_path)
    first = next(iter(BAD_RECORDS))
    with pytest.raises(BadSample, match=rf"sample '{first}': .*{BAD_RECORDS[first][1]}.*drop --strict"):
        llava_json(path, folder, strict=True)


def test_hf_records_are_validated_the_same_way(tmp_path):
    import datasets

    img = Image.new("RGB", (16, 16), "blue")
    rows = {
        "id": ["ok", "assistant_first", "two_images"],
        "messages": [
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
            ],
            [
                {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            ],
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
            ],
        ],
        "images": [[img], [img], [img, img]],
    }
    datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(
        tmp_path / "hf"
    )
    ds = hf_messages(tmp_path / "hf")
    reasons = {s["id"]: s["reason"] for s in ds.skipped}
    assert [s.id for s in ds.samples] == ["ok"]
    assert "turn order assistant/user" in reasons["assistant_first"]
    assert "2 image placeholders for 2 images" in reasons["two_images"]


def test_malformed_hf_message_content_is_a_bad_sample_not_a_traceback():
    from bench.data.formats import hf_record_messages

    for messages, says in [
        ([{"role": "user", "content": ["hi"]}], "malformed content item 'hi'"),
        ([{"role": "user", "content": 3}], "malformed message"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([], "no 'messages' list"),
    ]:
        with pytest.raises(BadSample, match=re.escape(says)):
            hf_record_messages({"messages": messages})


@pytest.mark.parametrize("records", [[], [{"id": "x", "conversations": []}], [{"id": "only", "conversations": GOOD}]])
def test_an_empty_or_all_bad_dataset_is_one_error_before_any_model(tmp_path, records, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "d.json").write_text(json.dumps(records))
    args = [
        "run",
        "--data",
        "llava",
        "--data-path",
        str(tmp_path / "d.json"),
        "--image-folder",
        str(tmp_path / "images"),
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "usable sample(s)" in err and "a run needs at least 2" in err, err
    assert not (tmp_path / "run").exists()  # nothing that looks like a run is left behind


def test_an_unreadable_held_out_image_is_skipped_before_training(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records = [{"id": f"r{i}", "image": f"{i}.png", "conversations": GOOD} for i in range(6)]
    records.append({"id": "bad", "image": "bad.png", "conversations": GOOD})
    (tmp_path / "d.json").write_text(json.dumps(records))
    data = {
        "kind": "llava",
        "path": str(tmp_path / "d.json"),
        "image_folder": str(tmp_path / "images"),
        "held_out": 0.99,
    }
    train, held, evals, _ = load_data(RunConfig(data=data), lambda m: None)
    assert "bad" not in [s.id for s in held.samples] and [s["id"] for s in held.skipped] == ["bad"]
    assert "cannot be read" in held.skipped[0]["reason"]


# ------------------------------------------------------------------ images
@pytest.fixture
def opened_files():
    """Paths this process opens while the fixture is active (an audit hook: it sees every ``open``)."""
    seen: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # cannot be removed; it goes quiet when the test ends
    yield seen
    active[0] = False


def test_no_file_outside_the_image_folder_is_read(tmp_path, opened_files):
    from bench.data.features import FeatureCache
    from encoders import build_encoder

    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "images" / "ok.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "secret.png")
    (tmp_path / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    names = ["ok.png", "../secret.png", str(tmp_path / "secret.png"), "link.png"]
    cache = FeatureCache(build_encoder("clip"), FileImages(tmp_path / "images", names), False, cached=False)
    opened_files.clear()
    part = cache.gather(list(range(4)))
    assert sorted(part.bad) == [1, 2, 3] and all("outside the image folder" in r for r in part.bad.values())
    assert not [p for p in opened_files if "secret" in p]
    assert any(p.endswith("ok.png") for p in opened_files)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    import resource

    assert PILLOW_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # the written-out default is Pillow's
    huge_png(tmp_path / "huge.png", 12000, 12000)
    table = FileImages(tmp_path, ["huge.png"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadSample, match=r"12000x12000 = 144.0 MP, over the limit of 89.5 MP; skipped before decod"):
        table.load(0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing was decoded
    Image.new("RGB", (40, 40), "red").save(tmp_path / "small.png")
    small = FileImages(tmp_path, ["small.png"])
    assert small.load(0).size == (40, 40)
    small.max_pixels = 1000  # configurable (--max-image-pixels): 40 x 40 = 1600 is over
    with pytest.raises(BadSample, match=r"40x40 = 0.0 MP, over the limit of 0.0 MP"):
        small.load(0)
    small.max_pixels = None  # None (or 0 from the command line): no limit
    assert small.load(0).size == (40, 40)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_encoder(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1000, 1200, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    table = FileImages(tmp_path, ["big.jpg"])
    assert table.load(0).size == (1200, 1000)  # no size: full decode
    drafted = table.load(0, size=224)
    assert drafted.size == (300, 250) and min(drafted.size) >= 224  # 1/4 scale: the largest that keeps >= 224
    assert table.load(0, size=600).size == (1200, 1000)  # not at least twice the input: untouched


# ------------------------------------------------------------ run directories
def saved_run(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"})
    return vlm.save(tmp_path / "run")


@pytest.mark.parametrize("where", ["name", "inner"])
def test_a_run_directory_cannot_choose_what_gets_imported(tmp_path, where, capsys):
    run = saved_run(tmp_path)
    spec = json.loads((run / "vlm_config.json").read_text())
    module = "connector_zoo_never_import_me"
    (tmp_path / f"{module}.py").write_text("raise SystemExit('imported!')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        spec["connector"] = (
            {"name": f"{module}:X"} if where == "name" else {"name": "cls_prune", "inner": f"{module}:X"}
        )
        (run / "vlm_config.json").write_text(json.dumps(spec))
        write_manifest(run, ["trainable.safetensors", "vlm_config.json"])  # a hostile directory comes consistent
        with pytest.raises(RegistryError, match=f"names the connector '{module}:X' by dotted path.*--allow-dotted"):
            VLM.load(run)
        assert module not in sys.modules
        assert main(["generate", str(run), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert "--allow-dotted-paths" in err and len(err.strip().splitlines()) == 1
        assert module not in sys.modules
        with pytest.raises(SystemExit, match="imported!"):  # the opt-in does import it (and so it ran)
            VLM.load(run, allow_dotted_paths=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)


def test_an_edited_model_config_is_refused_unless_no_verify(tmp_path, capsys):
    """vlm_config.json decides what is built; edited after the run wrote it, it no longer matches the manifest."""
    run = saved_run(tmp_path)
    spec = json.loads((run / "vlm_config.json").read_text())
    (run / "vlm_config.json").write_text(json.dumps({**spec, "max_length": 7}))
    with pytest.raises(ValueError, match="vlm_config.json does not match its SHA-256 in manifest.json"):
        VLM.load(run)
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert "does not match its SHA-256" in capsys.readouterr().err
    assert VLM.load(run, verify=False).max_length == 7


def garble(path: Path) -> None:
    """Flip bytes inside the tensor data, keeping the safetensors header valid (the file still loads)."""
    raw = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    for i in range(header + 16, header + 48):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_garbled_weights_are_refused_unless_no_verify(tmp_path, capsys):
    from safetensors.torch import load_file

    run = saved_run(tmp_path)
    garble(run / "trainable.safetensors")
    load_file(str(run / "trainable.safetensors"))  # the format alone cannot tell
    with pytest.raises(ValueError, match="does not match its SHA-256 in manifest.json"):
        VLM.load(run)
    for cmd in (["generate", str(run), "--prompt", "hi", "--max-new-tokens", "1"], ["profile", "--run", str(run)]):
        assert main(cmd) == 2 and "pass --no-verify" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "1", "--no-verify"]) == 0
    (run / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json beside it"):
        VLM.load(run)


# ----------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "name, settings, says",
    [
        ("qformer", {"num_queries": 0}, "qformer: num_queries=0 is out of range; allowed: an integer >= 1"),
        ("qformer", {"num_heads": 5}, "hidden_size=768 is not a multiple of num_heads=5"),
        ("qformer", {"dropout": 1.5}, "qformer: dropout=1.5 is out of range; allowed: a number in [0, 1)"),
        ("cls_prune", {"keep_ratio": "abc"}, "cls_prune: keep_ratio='abc' has the wrong type; allowed: a number in"),
        ("cls_prune", {"keep_ratio": 0}, "cls_prune: keep_ratio=0 is out of range; allowed: a number in (0, 1]"),
        ("cls_prune", {"keep_tokens": 0}, "keep_tokens=0 is out of range; allowed: an integer >= 1 or null"),
        ("focus_moe", {"budget": 2}, "focus_moe: budget=2 is out of range"),
        ("focus_moe", {"scales": [1, 3]}, "every scale must divide the window (4)"),
        ("focus_moe", {"tau": 0}, "focus_moe: tau=0 is out of range; allowed: a number > 0"),
        ("mlp2x_gelu", {"feature_select": "all"}, "feature_select='all' is not allowed; allowed: one of patch, cls"),
        ("mlp2x_gelu", {"depth": 2.5}, "mlp: depth=2.5 has the wrong type; allowed: an integer >= 1"),
    ],
)
def test_connector_settings_out_of_range_are_one_line(name, settings, says):
    with pytest.raises(SettingError) as err:
        build_connector(name, 64, 128, **settings)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--steps", "-3"], "argument --steps: -3 is out of range; allowed: an integer >= 0"),
        (["--grad-accum", "0"], "argument --grad-accum: 0 is out of range; allowed: an integer >= 1"),
        (["--batch-size", "0"], "argument --batch-size: 0 is out of range; allowed: an integer >= 1"),
        (["--held-out", "1.5"], "argument --held-out: 1.5 is out of range; allowed: a number in (0, 1)"),
        (["--eval-limit", "some"], "argument --eval-limit: 'some' is not an integer >= 0, or all"),
        (["--connector-arg", "num_queries=0"], "qformer: num_queries=0 is out of range; allowed: an integer >= 1"),
        (["--connector", "cls_prune", "--connector-arg", "keep_ratio=abc"], "keep_ratio='abc' has the wrong type"),
        (["--lr", "0"], "argument --lr: 0 is out of range; allowed: a number > 0"),
    ],
)
def test_bad_command_line_values_are_one_line(tmp_path, argv, says, capsys):
    code = None
    try:
        code = main(["run", "--world-scale", "0.01", "--pretrain-steps", "2", "--out", str(tmp_path / "r"), *argv])
    except SystemExit as exit_:  # argparse exits
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and len(err.splitlines()) == 1, err


def test_a_wrongly_typed_run_config_names_the_file_and_field(tmp_path):
    from dataclasses import asdict

    cfg = asdict(RunConfig())
    for field, value, says in [
        ("seed", "zero", "seed='zero' has the wrong type"),
        ("eval_limit", -1, "eval_limit=-1 is out of range"),
        ("stages", [{"stage": 1, "steps": "ten"}], "steps='ten' has the wrong type"),
        ("colour", 1, "unknown run settings ['colour']"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ValueError, match=re.escape(says)):
            RunConfig.from_file(tmp_path / "config.json").resolved_stages()


def test_steps_zero_means_zero_and_eval_limit_zero_means_none():
    assert StageConfig(steps=0).steps == 0 and StageConfig().steps is None
    with pytest.raises(SettingError, match="steps=-1"):
        StageConfig(steps=-1)
    stages = RunConfig(stages=[{"stage": 1, "steps": 0}]).resolved_stages()
    assert stages[0].steps == 0
    from bench.data.formats import Dataset, Sample
    from bench.evaluate.accuracy import qa_samples

    ds = Dataset("d", [Sample(str(i), [], 0, {"type": "colour"}) for i in range(5)], None)
    assert len(qa_samples(ds, 0)) == 0 and len(qa_samples(ds, None)) == 5 and len(qa_samples(ds, 2)) == 2


def test_world_config_read_back_from_json_builds_the_same_world():
    import dataclasses

    from bench.data.world import WorldConfig

    cfg = WorldConfig().scaled(0.01)
    again = WorldConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and again.key() == cfg.key() and isinstance(again.background, tuple)


# ---------------------------------------------------------- shared cache files
def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket
    import subprocess

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".tmp-thing-{host}-{dead_pid}-abc123"
    live = tmp_path / f".tmp-thing-{host}-{os.getppid()}-def456"
    other = tmp_path / f".tmp-other-{host}-{dead_pid}-abc123"  # another artefact's: not ours to judge here
    for d in (stale, live, other):
        (d / "part").mkdir(parents=True)
    materialize(tmp_path / "thing", lambda tmp: (tmp / "x").write_text("1"))
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "thing" / "x").read_text() == "1"
    assert remove_stale_temporaries(tmp_path, "other") == [other]


def test_worker_sockets_fit_at_the_kernels_limit_and_a_long_tmpdir_gets_a_short_one(monkeypatch):
    """multiprocessing binds ``<tmp>/pymp-<8>/listener-<8>``: 107 bytes fit (sun_path has 108 with the NUL), 108 do
    not; the loader's workers then get a short directory that exists and is writable."""
    import shutil
    import socket
    import tempfile

    from bench.data import loader

    tail = len("/pymp-xxxxxxxx/listener-xxxxxxxx")
    assert loader.worker_sockets_fit("/" + "a" * (106 - tail)) and not loader.worker_sockets_fit(
        "/" + "a" * (107 - tail)
    )
    # the kernel agrees: a socket path of 107 bytes binds, 108 does not
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # short: pytest's own directories may be too long already
    try:
        for length, ok in ((107, True), (108, False)):
            path = str(base / ("s" * (length - len(str(base)) - 1)))
            assert len(path) == length
            with socket.socket(socket.AF_UNIX) as s:
                if ok:
                    s.bind(path)
                else:
                    with pytest.raises(OSError):
                        s.bind(path)
    finally:
        shutil.rmtree(base)
    short = loader.short_temp_dir()
    assert loader.worker_sockets_fit(short) and os.access(short, os.W_OK)
    monkeypatch.setattr(loader.os, "access", lambda *a: False)  # no writable fallback: one line saying what to do
    with pytest.raises(RuntimeError, match="set TMPDIR to a shorter directory, or --num-workers 0"):
        loader.short_temp_dir()


MALLOC_PROBE = """
import resource, sys
import torch
from connector_zoo.io import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(12):  # a training step's pattern: the same large blocks allocated, written and freed again
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MB
    y = torch.ones(3 * 2**20)
    del x
    z = torch.ones(1000)
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(kept, min(faults[-3:]), sum(faults[-3:]))
"""


@pytest.mark.parametrize("how", ["keep", "default", "not-asked"])
def test_keep_freed_memory_stops_the_kernel_faulting_the_same_memory_in_again(how):
    """glibc unmaps a freed 64 MB block and the next one is faulted in and zeroed page by page (16,384 faults of 4 KB)
    at every step; with ``keep_freed_memory`` (asked for with ``CONNECTOR_ZOO_MALLOC=keep``), after a few steps the
    process reuses what it freed (no faults). Without the variable, glibc's behaviour stays. Page faults are counted,
    not timed: the same on any machine with glibc."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONNECTOR_ZOO_MALLOC": "keep"}
    if how == "not-asked":
        del env["CONNECTOR_ZOO_MALLOC"]
    arg = "default" if how == "default" else "keep"
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, arg], capture_output=True, text=True, env=env, check=True)
    kept, fewest, total = out.stdout.split()
    if how == "keep":  # after a few steps the heap holds what a step needs: nothing more is faulted in
        assert kept == "True" and int(total) < 100, out.stdout
    else:
        assert kept == "False" and int(fewest) > 10_000, out.stdout
