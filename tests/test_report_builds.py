"""`bench report` says when a table mixes builds of one backbone recipe (bench/report/builds.py): the same recipe
trained on two CPU types is two sets of bytes, and rows of two builds differ as if the backbones had another seed."""

from __future__ import annotations

import json

from conftest import bench
from test_sweep import fake_run

RECIPE = {"encoder": "encoder-clip-s2000-recolour-ef6e", "llm": "llm-tinyllama-smollm2-a03d", "world": "e6f2"}
AMD_FEATURES = "32643a7e2b3b9394c8239227"  # the kept records' encoder feature cache key (no backbone_bytes then)
INTEL_FEATURES = "a649e5ded8e6c3b184195d68"
INTEL = {"cpu": "Intel(R) Xeon(R) Processor", "isa": ["avx512_bf16"], "threads": 2, "cuda": None}


def record(root, connector, seed, test, *, features=None, suffix="", encoder=None, llm=None, machine=None, recipe=None):
    """A fake run (tests/test_sweep.py) on ``recipe``'s backbones, with what it says of their bytes."""
    fake_run(root, connector, seed, test, 0.5, 0.3, 64, backbones=recipe or RECIPE)
    path = root / f"{connector}-s{seed}" / "results.json"
    r = json.loads(path.read_text())
    if features:
        r["feature_cache"] = {"on": True, "dir": f"/root/.cache/connector_zoo/features/{features}{suffix}"}
    if encoder or llm:
        r["backbone_bytes"] = {"encoder": encoder, "llm": llm}
    if machine:
        r["machine"] = machine
    path.write_text(json.dumps(r))


def rows_of(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line[:1] == "|")
    return header, {c[0]: dict(zip(header, c)) for c in cells}


def report(tmp_path) -> str:
    proc = bench(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (tmp_path / "report" / "table.md").read_text()


def test_a_table_of_two_builds_of_one_recipe_gives_each_row_its_builds(tmp_path):
    """Seed 0 of both connectors on the AMD build (the feature cache key only, as records before backbone_bytes),
    seed 1 on the Intel rebuild (its key behind cls_prune's request suffix, and backbone_bytes): compared on the key
    all four hold, they are two builds; each row (and the blind row) is on A+B, and the note says what A and B are."""
    root = tmp_path / "runs"
    record(root, "mlp2x_gelu", 0, 0.9, features=AMD_FEATURES)
    record(root, "cls_prune", 0, 0.8, features=AMD_FEATURES, suffix="+attn")
    record(root, "mlp2x_gelu", 1, 0.7, features=INTEL_FEATURES, encoder="e1" * 8, llm="f2" * 8, machine=INTEL)
    record(root, "cls_prune", 1, 0.6, features=INTEL_FEATURES, suffix="+attn", encoder="e1" * 8, machine=INTEL)
    table = report(tmp_path)
    header, rows = rows_of(table)
    assert header[:3] == ["configuration", "seeds", "backbones"]
    assert rows["clip + mlp2x_gelu + tinyllama (mini)"]["backbones"] == "A+B"
    # one blind row per build: two builds of the world LLM are two LLMs as loaded (seed 0 answered on A, 1 on B)
    assert "blind baseline: tinyllama without the image" not in rows
    for letter in "AB":  # each of one seed (the column counts seeds)
        blind = rows[f"blind baseline: tinyllama without the image (backbones {letter})"]
        assert (blind["backbones"], blind["seeds"]) == (letter, "1")
    note = table.split("\n\n")[1]
    assert "mixes builds of one backbone recipe" in note
    a = note[note.index("A: ") : note.index("B: ")]
    b = note[note.index("B: ") :]
    assert f"encoder features {AMD_FEATURES[:8]}" in a and "machine not recorded" in a and "2 runs" in a
    assert f"encoder features {INTEL_FEATURES[:8]}" in b and "Intel(R) Xeon(R) Processor (avx512_bf16)" in b
    assert "LLM bytes not recorded by all" in a  # one Intel record has no LLM digest: the LLM is not compared
    csv = (tmp_path / "report" / "table.csv").read_text().splitlines()
    assert csv[0].startswith("configuration,seeds,backbones,") and any(",2,A+B," in line for line in csv)


def test_one_build_of_each_recipe_has_no_build_column(tmp_path):
    """The same encoder bytes read through other request suffixes, a record with backbone_bytes beside one without,
    and a second recipe (the 32-px encoder, its own key) built once: one build of each recipe, no column, no note."""
    root = tmp_path / "runs"
    record(root, "mlp2x_gelu", 0, 0.9, features=AMD_FEATURES)
    record(root, "cls_prune", 0, 0.8, features=AMD_FEATURES, suffix="+attn", encoder="e1" * 8, llm="f2" * 8)
    px32 = {**RECIPE, "encoder": "encoder-clip-s2000-px32-recolour-978e"}
    record(root / "px32", "mlp2x_gelu", 0, 0.7, features="14520f8b6fcc3ff874633cfd", recipe=px32)
    r = json.loads((root / "px32" / "mlp2x_gelu-s0" / "results.json").read_text())
    r["config"]["data"] = {"pretrain": {"encoder_px": 32}}
    (root / "px32" / "mlp2x_gelu-s0" / "results.json").write_text(json.dumps(r))
    table = report(tmp_path)
    header, _ = rows_of(table)
    assert "backbones" not in header and "mixes builds" not in table


def test_bytes_decide_over_the_feature_key_and_the_llm_counts_where_all_hold_it(tmp_path):
    """Records that all hold backbone_bytes are compared on them: equal encoder bytes under two feature keys (another
    cache path) are one encoder, and two LLM digests are two builds all the same."""
    from bench.report.builds import backbone_builds
    from bench.report.tables import load_runs, run_name

    root = tmp_path / "runs"
    record(root, "linear", 0, 0.5, features=AMD_FEATURES, encoder="e1" * 8, llm="f2" * 8)
    record(root, "linear", 1, 0.5, features=INTEL_FEATURES, encoder="e1" * 8, llm="f2" * 8)
    assert not backbone_builds(load_runs([root]), run_name).mixed
    record(root, "mlp2x_gelu", 0, 0.5, features=AMD_FEATURES, encoder="e1" * 8, llm="99" * 8)
    builds = backbone_builds(load_runs([root]), run_name)
    assert builds.mixed and len(builds.legend) == 2
    assert "LLM bytes 99999999" in builds.legend[0] and "(1 run;" in builds.legend[0]
    assert "LLM bytes f2f2f2f2" in builds.legend[1] and "(2 runs;" in builds.legend[1]


def test_runs_of_one_recipe_that_say_nothing_of_their_bytes_are_named(tmp_path):
    """Two runs with the feature cache off and no backbone_bytes: no build can be told; the note names them rather
    than calling them one build."""
    from bench.report.builds import backbone_builds, legend_note
    from bench.report.tables import load_runs, run_name

    root = tmp_path / "runs"
    record(root, "linear", 0, 0.5)
    record(root, "linear", 1, 0.5)
    builds = backbone_builds(load_runs([root]), run_name)
    assert not builds.mixed and builds.untold == ["clip + linear + tinyllama (mini)"]
    assert "cannot be told apart" in legend_note(builds)


def test_the_html_page_table_has_the_build_column_and_its_note(tmp_path):
    from bench.report.builds import legend_note
    from bench.report.html import table_context
    from bench.report.tables import aggregate, builds_of, load_runs

    root = tmp_path / "runs"
    record(root, "linear", 0, 0.5, features=AMD_FEATURES)
    record(root, "linear", 1, 0.4, features=INTEL_FEATURES)
    runs = load_runs([root])
    builds = builds_of(runs)
    ctx = table_context(aggregate(runs, builds), legend_note(builds))
    assert [h["label"] for h in ctx["header"][:3]] == ["configuration", "seeds", "backbones"]
    by_name = {r["cells"][0]["text"]: r["cells"][2]["text"] for r in ctx["rows"]}
    assert by_name["clip + linear + tinyllama (mini)"] == "A+B" and "A: " in ctx["builds_note"]
    assert by_name["blind baseline: tinyllama without the image (backbones B)"] == "B"


def test_a_sweep_says_before_it_trains_that_its_cells_would_mix_builds(tmp_path, monkeypatch):
    """`bench sweep` compares the folder's records of its backbone recipes with this machine's build before the first
    cell trains: on the bytes where this machine has built them (a record of other bytes: warned; of these: quiet),
    else on the machine the records name (another CPU: warned; this one: quiet)."""
    from bench.data.world import WorldConfig, world_dir
    from bench.report.sweep import other_builds
    from bench.run.record import manifest_digest
    from bench.train.precision import machine_info
    from bench.train.pretrain import world_backbones
    from bench.train.settings import RunConfig

    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(encoder={"name": "clip"}, connector={"name": "linear"}, llm={"name": "tinyllama"}, seed=0)
    want = world_backbones(cfg)
    out = tmp_path / "zoo"
    here = machine_info()
    record(out, "linear", 0, 0.5, recipe=want, machine={**here, "cpu": "AMD EPYC 9B14", "isa": ["avx2"]})
    said = other_builds(out, cfg)  # not built here: the records' machine decides
    assert said and "1 of its 1 records" in said and "AMD EPYC 9B14 (avx2)" in said and "has not built" in said
    assert other_builds(tmp_path / "elsewhere", cfg) is None  # no folder yet
    record(out / "mine", "linear", 0, 0.5, recipe=want, machine=here)
    assert other_builds(out / "mine", cfg) is None  # this machine's own records

    built = world_dir(WorldConfig()) / "backbones" / want["encoder"]  # now this machine has built the encoder
    built.mkdir(parents=True)
    (built / "manifest.json").write_text('{"model.safetensors": "ab12"}')
    ours = manifest_digest(built)
    record(out / "bytes", "linear", 0, 0.5, recipe=want, encoder=ours, machine={**here, "cpu": "another"})
    assert other_builds(out / "bytes", cfg) is None  # the same bytes, whatever machine made the record
    record(out / "bytes", "linear", 1, 0.5, recipe=want, encoder="0" * 16)
    said = other_builds(out / "bytes", cfg)
    assert said and "1 of its 2 records" in said and "other bytes" in said and str(built.parent) in said
    # records before backbone_bytes: compared on the feature key of a record of this machine's bytes, where one is
    record(out / "keys", "linear", 0, 0.5, recipe=want, encoder=ours, features=INTEL_FEATURES)
    record(out / "keys", "mlp2x_gelu", 0, 0.5, recipe=want, features=INTEL_FEATURES, suffix="+attn")
    assert other_builds(out / "keys", cfg) is None  # the same key: the same encoder
    record(out / "keys", "qformer", 0, 0.5, recipe=want, features=AMD_FEATURES)
    said = other_builds(out / "keys", cfg)
    assert said and "1 of its 3 records" in said and "other bytes" in said
    other = {**want, "encoder": "encoder-clip-another-recipe"}
    record(out / "recipe", "linear", 0, 0.5, recipe=other, encoder="0" * 16)
    assert other_builds(out / "recipe", cfg) is None  # records of another recipe are another configuration
