"""`bench report --html`: the page's numbers against hand computations, the world's error breakdown against the
questions' own answers, and (slow) the page as a person sees it in headless Chromium."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import bench
from PIL import Image

from bench.data.world import CELLS, NUMBERS, World, WorldConfig
from bench.report.breakdown import breakdown, question_facts, referents
from bench.report.plots import pareto_front

SMALL_WORLD = WorldConfig().scaled(0.01)  # 10 test images, 30 questions


@pytest.fixture(scope="module")
def world():
    return World(SMALL_WORLD, progress=False)


def test_referents_are_the_objects_the_answers_describe():
    """For every question of a full-size test and compositional split, the objects the question's words pick out
    are those its answer describes: the colour answered is theirs, the size, the shape, the cell; a count answers
    how many; an existence question has referents exactly when it answers yes (two when the pair is there twice); a
    relation names two objects."""
    world = World(WorldConfig(), progress=False)
    checked = 0
    for split in ("test", "compositional"):
        for record in world.records(split):
            for qa in record["qa"]:
                refs, answer = referents(qa["question"], qa["type"], record["objects"]), qa["answer"]
                attribute = {"colour": "colour", "shape": "shape", "size": "size"}.get(qa["type"])
                if attribute:
                    assert [o[attribute] for o in refs] == [answer], (qa, record["objects"])
                elif qa["type"] == "position":
                    assert [CELLS[o["cell"]] for o in refs] == [answer]
                elif qa["type"] == "count":
                    assert NUMBERS[len(refs)] == answer
                elif qa["type"] == "exist":
                    assert bool(refs) == (answer == "yes")
                else:
                    assert len(refs) == 2
                checked += 1
    assert checked > 4400  # 1,500 images, up to 3 questions each
    with pytest.raises(ValueError, match="does not follow the world's template"):
        referents("What colour is it?", "colour", [])


def test_breakdown_by_hand():
    """Two seeds of one configuration on four questions: q1, q2 about small objects (1 object), q3 about a large one
    (2 objects), q4 about none (2 objects). Seed 0 right on q1, q3; seed 1 right on q1, q2, q3, q4.
    small: seed accuracies 1/2 and 2/2 -> mean 0.75, sample std sqrt(2 * 0.25^2) = 0.354; large 1.0 ± 0; none 0 and 1
    -> 0.5 ± 0.707; one object = the small bucket; two objects: 1/2 and 2/2 -> 0.75 ± 0.354."""
    facts = {
        "q1": {"size": "small", "objects": 1},
        "q2": {"size": "small", "objects": 1},
        "q3": {"size": "large", "objects": 2},
        "q4": {"size": "none", "objects": 2},
    }
    runs = [
        {
            "config": {"seed": s},
            "metrics": {
                "test": {"accuracy": {"per_question": {"ids": ["q1", "q2", "q3", "q4", "elsewhere"], "correct": c}}}
            },
        }
        for s, c in ((0, [1, 0, 1, 0, 1]), (1, [1, 1, 1, 1, 0]))
    ]
    bd = breakdown(runs, facts, lambda r: "cfg")["cfg"]
    assert bd["size"]["small"] == pytest.approx((0.75, 0.5**0.5 / 2, 2))
    assert bd["size"]["large"] == (1.0, 0.0, 1) and bd["size"]["none"] == pytest.approx((0.5, 0.5**0.5, 1))
    assert bd["objects"][1] == pytest.approx((0.75, 0.5**0.5 / 2, 2))
    assert bd["objects"][2] == pytest.approx((0.75, 0.5**0.5 / 2, 2))


def test_pareto_front_by_hand():
    # (tokens, accuracy): (16, .5) and (64, .6) are on the front; (64, .55) and (32, .5) are beaten
    assert pareto_front([(16, 0.5), (64, 0.6), (64, 0.55), (32, 0.5)]) == [0, 1]
    assert pareto_front([(8, 0.4)]) == [0]


def fake_runs(root: Path, world: World, answers_by_connector: dict[str, list[list[str]]]) -> None:
    """results.json files for a small world's test questions: per connector and seed, the answers given."""
    facts = question_facts(world, "test")
    ids = list(facts)
    for connector, per_seed in answers_by_connector.items():
        for seed, answers in enumerate(per_seed):
            correct = [int(a == facts[q]["truth"]) for q, a in zip(ids, answers)]
            per_type: dict[str, list[int]] = {}
            for q, c in zip(ids, correct):
                per_type.setdefault(facts[q]["type"], []).append(c)
            acc = {
                "exact_match": sum(correct) / len(correct),
                "per_type": {t: sum(v) / len(v) for t, v in per_type.items()},
                "per_question": {"ids": ids, "correct": correct, "answers": answers},
            }
            results = {
                "config": {
                    "encoder": {"name": "clip"},
                    "connector": {"name": connector},
                    "llm": {"name": "tinyllama"},
                    "recipe": "mini",
                    "seed": seed,
                    "data": {"kind": "world", "world": dataclasses.asdict(SMALL_WORLD)},
                },
                "metrics": {"test": {"accuracy": acc, "blind": {"exact_match": 0.25, "per_type": {}}}},
                "visual_tokens_per_image": {"mean": 64.0 if connector == "mlp2x_gelu" else 16.0},
                "parameters": {"trainable": 1000},
                "train_samples_per_second": 10.0,
                "loss_history": [[{"step": k, "loss": 2.0 / k + seed} for k in range(1, 6)]],
            }
            d = root / f"{connector}-s{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(results))


class Page(HTMLParser):
    """The parts of the page the tests read: table cells by row, gallery cards with their answers, images."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.cards, self.images, self.stack = [], [], [], []
        self.in_ablation = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "ablation":
            self.in_ablation = True
        if tag == "tr" and self.in_ablation:
            self.rows.append([])
        if tag == "td" and self.in_ablation:
            self.rows[-1].append({"class": a.get("class", ""), "text": ""})
        if tag == "div" and "card" in a.get("class", "").split():
            self.cards.append({"type": a["data-type"], "answers": []})
        if tag == "tr" and self.cards and a.get("class") in ("right", "wrong") and not self.in_ablation:
            self.cards[-1]["answers"].append(a["class"])
        if tag == "img":
            self.images.append(a["src"])
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_ablation = False

    def handle_data(self, data):
        if self.in_ablation and self.rows and self.rows[-1] and self.stack[-1] == "td":
            self.rows[-1][-1]["text"] += data.strip()


def test_html_page_by_hand(tmp_path, world):
    """mlp2x_gelu answers every question right on seed 0 and all but the first on seed 1; linear answers "no" to
    everything. The page: one row per configuration and the blind row, mlp2x_gelu's test accuracy (100 and 96.7 over
    30 questions: 98.3 ± 2.4) marked best, linear's tokens (16) marked best; a gallery of at most 2 questions per type
    with each configuration's answers, right and wrong marked as they are; inline PNGs of the world's 64x64 images;
    the same bytes when rebuilt."""
    facts = question_facts(world, "test")
    truths = [f["truth"] for f in facts.values()]
    fake_runs(
        tmp_path / "runs", world, {"mlp2x_gelu": [truths, ["wrong"] + truths[1:]], "linear": [["no"] * len(truths)] * 2}
    )
    proc = bench(
        [
            "report",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "tables"),
            "--html",
            str(tmp_path / "r1"),
            "--gallery-per-type",
            "2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "r1" / "index.html").read_text()
    page = Page(text)
    by_name = {r[0]["text"]: r for r in page.rows if r}
    assert set(by_name) == {
        "clip + mlp2x_gelu + tinyllama (mini)",
        "clip + linear + tinyllama (mini)",
        "blind baseline: tinyllama without the image",
    }
    mlp, lin = by_name["clip + mlp2x_gelu + tinyllama (mini)"], by_name["clip + linear + tinyllama (mini)"]
    assert mlp[2] == {"class": "best", "text": "98.3 ± 2.4"}
    no_share = 100 * sum(t == "no" for t in truths) / len(truths)
    assert lin[2]["text"] == f"{no_share:.1f} ± 0.0" and lin[2]["class"] == ""
    tokens_col = [i for i, c in enumerate(lin) if c["text"] == "16.0 ± 0.0"]
    assert tokens_col and lin[tokens_col[0]]["class"] == "best" and mlp[tokens_col[0]]["class"] == ""
    types = {f["type"] for f in facts.values()}
    assert {c["type"] for c in page.cards} == types
    assert all(sum(c["type"] == t for c in page.cards) <= 2 for t in types)
    # each card: two answers (mlp2x_gelu's lowest seed right, linear right only where the truth is "no")
    cards = re.findall(r'<div class="card" data-type="[a-z]+" id="q-([^"]+)">', text)
    for qid, card in zip(cards, page.cards):
        truth = facts[qid.replace("-q", "/q")]["truth"]
        assert card["answers"] == ["right" if truth == "no" else "wrong", "right"], (qid, truth, card)
    pngs = [src for src in page.images if src.startswith("data:image/png;base64,")]
    assert len(pngs) == len(page.cards)
    assert Image.open(io.BytesIO(base64.b64decode(pngs[0].split(",", 1)[1]))).size == (64, 64)
    svgs = [src for src in page.images if src.startswith("data:image/svg+xml;base64,")]
    assert len(svgs) >= 4  # tokens Pareto, per-type bars, loss curves, breakdown
    assert 'id="breakdown-table"' in text and "http://" not in text.replace("http://www.w3.org", "")
    again = bench(
        [
            "report",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "tables"),
            "--html",
            str(tmp_path / "r2"),
            "--gallery-per-type",
            "2",
        ]
    )
    assert again.returncode == 0 and (tmp_path / "r2" / "index.html").read_text() == text


def test_html_page_without_images_keeps_the_table(tmp_path, world):
    """Runs whose images are not on this machine (a LLaVA folder elsewhere): the page is written with the table and
    says why there is no gallery."""
    facts = question_facts(world, "test")
    fake_runs(tmp_path / "runs", world, {"linear": [[f["truth"] for f in facts.values()]]})
    path = tmp_path / "runs" / "linear-s0" / "results.json"
    r = json.loads(path.read_text())
    r["config"]["data"] = {"kind": "llava", "path": str(tmp_path / "gone.json"), "image_folder": str(tmp_path)}
    path.write_text(json.dumps(r))
    proc = bench(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "t"), "--html", str(tmp_path / "page")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "page" / "index.html").read_text()
    assert "clip + linear + tinyllama (mini)" in text and "No gallery: the gallery&#39;s images could not be" in text
    assert "gone.json" in text


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path, world):
    """The page as a browser shows it: no console errors, every image decoded, sorting by a column reorders the
    rows, the question-type filter hides the other cards; a screenshot is taken."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser test needs Debian's chromium (.ci/run installs it: apt-get install chromium)"
    facts = question_facts(world, "test")
    truths = [f["truth"] for f in facts.values()]
    fake_runs(tmp_path / "runs", world, {"mlp2x_gelu": [truths, truths], "linear": [["no"] * len(truths)] * 2})
    proc = bench(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "t"), "--html", str(tmp_path / "page")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "page" / "index.html").as_uri())
        page.wait_for_load_state("load")
        assert page.locator("#ablation tbody tr").count() == 3
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("img").count() >= 4 + len(facts) // 10
        first = lambda: page.locator("#ablation tbody tr td:first-child").all_inner_texts()  # noqa: E731
        page.locator("#ablation thead th", has_text="test acc").click()  # ascending
        assert first()[-1] == "clip + mlp2x_gelu + tinyllama (mini)"
        page.locator("#ablation thead th", has_text="test acc").click()  # descending
        assert first()[0] == "clip + mlp2x_gelu + tinyllama (mini)"
        page.locator("#filters button", has_text="count").click()
        visible = page.locator(".gallery .card:visible")
        assert visible.count() >= 1 and set(visible.evaluate_all("cs => cs.map(c => c.dataset.type)")) == {"count"}
        page.locator("#filters button", has_text="all").click()
        assert page.locator(".gallery .card:visible").count() == page.locator(".gallery .card").count()
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert Image.open(shot).size[0] == 1300 and shot.stat().st_size > 20_000


def test_smoothing_by_hand():
    from bench.report.charts import smooth

    assert smooth([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]  # under 50 steps: a window of 1
    values = [float(i % 2) for i in range(100)]  # window 2: the mean of each pair
    assert smooth(values)[:3] == [0.0, 0.5, 0.5] and set(smooth(values)[1:]) == {0.5}
