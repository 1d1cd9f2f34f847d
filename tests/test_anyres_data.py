"""AnyRes through the input pipeline and ``bench run``: the feature cache keeps a row per view, keyed by the image and
by what cuts the view out of it, so another tiling of the same image, or the image untiled, is never served these
rows; a tiled run trains (packed or not), records its tiling, saves, reloads and evaluates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MICRO, bench
from PIL import Image

from bench.data.features import FeatureCache
from bench.data.formats import llava_json
from bench.data.loader import Collator
from connector_zoo.model.vlm import VLM, VLMInputs
from encoders.anyres import DEFAULT_PINPOINTS, AnyResGeometry, scaled_pinpoints

SIZES = [(70, 150), (150, 70), (64, 64)]  # (height, width): wide, tall, square


def picture(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def dataset(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i, (h, w) in enumerate(SIZES):
        picture(i, h, w).save(folder / f"{i}.png")
        records.append(
            {
                "id": f"r{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": f"picture {i}"},
                ],
            }
        )
    (tmp_path / "chat.json").write_text(json.dumps(records))
    return llava_json(tmp_path / "chat.json", folder)


def batch_of(encoder, llm, ds, root, tiling):
    cache = FeatureCache(encoder, ds.images, with_attention=False, root=root, tiling=tiling)
    return cache, Collator(llm, cache, visual_budget=400, max_length=None).batch(ds.samples)


def expected_rows(encoder, ds, tiling) -> torch.Tensor:
    """Every view of every image encoded now, in order: what the cache must give."""
    views = [v for s in ds.samples for v in tiling.views(ds.images.load(s.image))]
    return encoder.encode_images(views).patches


def test_the_cache_keeps_a_row_per_view_keyed_by_the_tiling(tmp_path, encoders, llms):
    enc, llm, ds, root = encoders["clip"], llms["vicuna"], dataset(tmp_path), tmp_path / "features"
    llava_next = AnyResGeometry(scaled_pinpoints(DEFAULT_PINPOINTS, 64), 64)
    small = AnyResGeometry(((64, 64), (128, 128)), 64)  # another tiling of the same images
    cache, got = batch_of(enc, llm, ds, root, llava_next)
    views = [llava_next.num_views(h, w) for h, w in SIZES]
    assert cache.forwards == sum(views) == got.inputs.features.patches.shape[0]
    assert got.inputs.image_sizes == SIZES
    torch.testing.assert_close(got.inputs.features.patches, expected_rows(enc, ds, llava_next), rtol=0, atol=1e-6)

    # warm: nothing encoded (the views follow from the image headers), the same rows
    cache, warm = batch_of(enc, llm, ds, root, llava_next)
    assert cache.forwards == 0 and warm.inputs.image_sizes == SIZES
    torch.testing.assert_close(warm.inputs.features.patches, got.inputs.features.patches, rtol=0, atol=0)

    # another tiling: its views differ from view 1 on (the 64x64 image: one 64x64 tile against two halves of a
    # 64x128 canvas), so a key without the pinpoints would serve the wrong rows here
    cache, other = batch_of(enc, llm, ds, root, small)
    assert cache.forwards == sum(small.num_views(h, w) for h, w in SIZES)
    torch.testing.assert_close(other.inputs.features.patches, expected_rows(enc, ds, small), rtol=0, atol=1e-6)
    square = sum(views[:2])  # the 64x64 image's rows start here under LLaVA-NeXT's pinpoints
    assert (got.inputs.features.patches[square + 1] - other.inputs.features.patches[-1]).abs().max() > 1e-2

    # untiled: one row per image, not any view's
    cache, plain = batch_of(enc, llm, ds, root, None)
    assert cache.forwards == len(SIZES) and plain.inputs.image_sizes is None


def test_an_unreadable_image_drops_its_sample_and_only_its_views(tmp_path, encoders, llms):
    ds = dataset(tmp_path)
    (tmp_path / "images" / "1.png").write_bytes(b"not a png")
    tiling = AnyResGeometry(scaled_pinpoints(DEFAULT_PINPOINTS, 64), 64)
    _, got = batch_of(encoders["clip"], llms["vicuna"], ds, tmp_path / "features", tiling)
    assert [ds.samples[k].id for k in got.kept] == ["r0", "r2"] and got.skipped[0][0] == "r1"
    assert got.inputs.image_sizes == [SIZES[0], SIZES[2]]
    assert got.inputs.features.patches.shape[0] == tiling.num_views(*SIZES[0]) + tiling.num_views(*SIZES[2])


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("anyres") / "run"
    flags = ["--tiling", "anyres", "--grid-pinpoints", "64x128,128x64,128x128", "--packing", "on", "--no-profile"]
    proc = bench([*MICRO, *flags, "--out", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


@pytest.mark.slow
def test_a_tiled_run_trains_packed_records_its_tiling_and_evaluates_after_loading(tiled_run, tmp_path):
    run, proc = tiled_run
    spec = {"name": "anyres", "grid_pinpoints": [[64, 128], [128, 64], [128, 128]]}
    assert json.loads((run / "config.json").read_text())["tiling"] == spec
    assert json.loads((run / "vlm_config.json").read_text())["tiling"] == spec
    assert "AnyRes tiling at 64x128,128x64,128x128" in proc.stdout
    # a 64x64 world image: the 64x128 pinpoint (2 tiles), 8x16 patches unpadded to 8x8, + 8 newlines + 64 global
    vlm = VLM.load(run).eval()
    pixels, sizes = vlm.preprocess([picture(0, 64, 64)])
    with torch.no_grad():
        visual = vlm.visual_tokens(VLMInputs([torch.tensor([0])], pixel_values=pixels, image_sizes=sizes))
    assert pixels.shape[0] == 3 and int(visual.num_tokens[0]) == 64 + 8 * (8 + 1)
    evaluated = bench(["eval", str(run), "--eval-limit", "4"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "accuracy" in evaluated.stdout
    again = bench(
        ["run", "--config", str(run / "config.yaml"), "--steps", "0", "--eval-limit", "0", "--out", str(tmp_path / "b")]
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["tiling"] == spec


@pytest.mark.slow
def test_lmms_eval_scores_a_tiled_run_with_its_views(tiled_run):
    """lmms-eval's loglikelihood on an image request goes through the model's views: the same log-probability as the
    model's own forward on the tiled image."""
    from lmms_eval.api.instance import Instance

    from connector_zoo.model.lmms import ConnectorZooLMM

    run, _ = tiled_run
    model = ConnectorZooLMM(run=str(run))
    model.task_dict = {"t": {"test": [{"q": 0}]}}
    image = picture(3, 70, 150)
    request = Instance(
        "loglikelihood",
        ("What colour is the circle?", " red", lambda doc: [image], 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    ((logprob, _),) = model.loglikelihood([request])
    vlm, llm = model.vlm, model.vlm.llm
    prompt = llm.encode_prompt([{"role": "user", "content": "<image>\nWhat colour is the circle?"}])
    cont = llm.tokenizer(" red", add_special_tokens=False)["input_ids"]
    pixels, sizes = vlm.preprocess([image])
    assert pixels.shape[0] == 3  # 70x150 among these pinpoints: 64x128, 2 tiles + the global view
    with torch.no_grad():
        logits = vlm(VLMInputs([torch.tensor(prompt + cont)], pixel_values=pixels, has_image=[True], image_sizes=sizes))
    rows = logits.logits[0, -len(cont) - 1 : -1].float().log_softmax(-1)
    assert logprob == pytest.approx(rows[range(len(cont)), cont].sum().item(), rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_the_pruning_curve_of_a_tiled_run_prunes_every_view(tiled_run):
    """`bench prune-curve` on a tiled run: the reducers run view by view on the tiled features (64x64 world images:
    the 64x128 pinpoint, 2 tiles + the global view, 64 patches each). A reducer's tokens have no grid, so its views
    are concatenated (192 tokens at 100 %, padding included) where the unpruned model unpads and adds newlines (64 +
    8 x (8 + 1) = 136); at 100 % cls_prune and random_keep keep every token in raster order: the same answers."""
    from bench.evaluate.prune_curve import pruning_curve

    run, _ = tiled_run
    rows = pruning_curve(run, [1.0, 0.25], eval_limit=6, seeds=(0,), methods=("cls_prune", "random_keep", "avgpool"))
    by = {(r["method"], r["keep_ratio"]): r for r in rows}
    assert by[("cls_prune", 1.0)]["answers"] == by[("random_keep", 1.0)]["answers"]
    assert [by[("cls_prune", r)]["tokens"] for r in (1.0, 0.25)] == [192.0, 48.0]
    # avgpool keeps a grid (4x4 a view): unpadded to 4x4 with 4 newlines, + the global view's 16
    assert by[("avgpool", 0.25)]["tokens"] == 16 + 4 * (4 + 1)
    assert by[("cls_prune", 0.25)]["unpruned_accuracy"] == by[("avgpool", 0.25)]["unpruned_accuracy"]


def test_grid_pinpoints_without_tiling_are_refused(tmp_path):
    proc = bench([*MICRO, "--grid-pinpoints", "64x128", "--out", str(tmp_path / "x")])
    assert proc.returncode == 2 and "--tiling anyres" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_large_jpeg_is_tiled_from_its_full_decode(tmp_path, encoders, llms):
    """Untiled, a JPEG twice the encoder's input is decoded at a reduced scale (draft); tiled it is not: its views are
    cut from the image its header describes, as LLaVA-NeXT's processor cuts them."""
    folder = tmp_path / "images"
    folder.mkdir()
    y, x = np.mgrid[0:800, 0:1000]
    smooth = np.stack([x * 255 // 1000, y * 255 // 800, (x + y) * 255 // 1800], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(folder / "big.jpg", quality=95)
    record = {
        "id": "big",
        "image": "big.jpg",
        "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "a gradient"}],
    }
    (tmp_path / "chat.json").write_text(json.dumps([record]))
    ds = llava_json(tmp_path / "chat.json", folder)
    tiling = AnyResGeometry(scaled_pinpoints(DEFAULT_PINPOINTS, 64), 64)
    _, got = batch_of(encoders["clip"], llms["vicuna"], ds, tmp_path / "features", tiling)
    assert got.inputs.image_sizes == [(800, 1000)]
    full = Image.open(folder / "big.jpg").convert("RGB")
    expected = encoders["clip"].encode_images(tiling.views(full)).patches
    torch.testing.assert_close(got.inputs.features.patches, expected, rtol=0, atol=1e-6)
