"""AnyRes in the composed model against transformers' LLaVA-NeXT (an independent implementation of the same method).

- Views: ``VLM.preprocess`` (encoders/anyres.py) gives the pixels and image sizes that ``LlavaNextImageProcessor``
  gives (best resolution, aspect-kept bicubic resize, centred black padding, raster tiles, the global view first).
- Model: an exported AnyRes model (``LlavaNextForConditionalGeneration``) computes our logits and greedy tokens, on
  images of wide, tall and square aspect ratios, with ``mlp2x_gelu`` and ``linear`` projectors, CLIP (CLS dropped)
  and SigLIP (no CLS): that pins the per-view projector, the tile layout, the unpadding and the newline tokens.
- Connectors without a patch grid (Q-Former) get the views' tokens one after the other; reducing connectors with a
  grid (pixel_shuffle) get the layout at their output grid, counted by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BUILTIN_CONNECTORS
from PIL import Image
from test_anyres import TINY_TOWER

from connector_zoo.model.llava import ExportError, export_hf, llava_next_image_processor
from connector_zoo.model.vlm import VLM, VLMInputs
from connectors import CONNECTORS, build_connector
from encoders.anyres import DEFAULT_PINPOINTS, scaled_pinpoints

QUESTION = "What colour is the circle?"
PROMPT = [{"role": "user", "content": "<image>\n" + QUESTION}]


def tiling(tile: int) -> dict:
    return {"name": "anyres", "grid_pinpoints": [list(p) for p in scaled_pinpoints(DEFAULT_PINPOINTS, tile)]}


def scene(height: int, width: int, seed: int) -> Image.Image:
    """An image with structure everywhere (a gradient and noise), so that a misplaced tile or row shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([255 * x / width, 255 * y / height, rng.integers(0, 256, (height, width))], axis=-1)
    return Image.fromarray(arr.astype(np.uint8))


# wide (two tiles side by side, padding above and below), tall (three tiles, padding at the sides), square (2x2)
SIZES = [(70, 150), (190, 60), (128, 128)]


def anyres_vlm(encoder: str, connector: str, llm: str) -> VLM:
    torch.manual_seed(0)
    probe = VLM.build({"name": encoder}, {"name": "linear"}, {"name": llm})
    vlm = VLM.build({"name": encoder}, {"name": connector}, {"name": llm}, tiling=tiling(probe.encoder.info.image_size))
    with torch.no_grad():
        for p in vlm.connector.parameters():
            p.normal_(0, 0.3)  # a non-trivial projector
        vlm.tiling.image_newline.normal_(0, 1.0)  # a newline that matters
    return vlm.eval()


@pytest.mark.parametrize(
    "encoder,connector,llm",
    [("clip", "mlp2x_gelu", "vicuna"), ("clip", "linear", "qwen3"), ("siglip", "mlp2x_gelu", "tinyllama")],
)
def test_exported_llava_next_matches_logits_and_greedy_tokens(tmp_path, encoder, connector, llm):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vlm = anyres_vlm(encoder, connector, llm)
    tile = vlm.encoder.info.image_size
    export_hf(vlm, tmp_path / "next")
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "next").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "next")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
        **vlm.llm.generation_template_kwargs,
    )
    ids = torch.tensor(vlm.llm.encode_prompt(PROMPT))
    p = int((ids == vlm.llm.image_token_id).nonzero())
    images = [scene(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    counts = set()
    for img in images:
        hf_inputs = processor(text=text, images=[img], return_tensors="pt")
        ours_pixels, ours_sizes = vlm.preprocess([img])
        n_views = ours_pixels.shape[0]
        assert ours_sizes == [tuple(hf_inputs["image_sizes"][0].tolist())]
        # our views are LLaVA-NeXT's: same count, same pixels (its PIL backend resizes as we do; the torchvision
        # backend that AutoProcessor may load resamples differently, by a few grey levels)
        assert n_views == int(image_size_to_num_patches(img.size[::-1], hf.config.image_grid_pinpoints, tile))
        pil = llava_next_image_processor(vlm)(images=[img], return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours_pixels, pil[:n_views], rtol=0, atol=1e-6)
        inputs = VLMInputs(
            [ids], pixel_values=hf_inputs["pixel_values"][0, :n_views], has_image=[True], image_sizes=ours_sizes
        )
        with torch.no_grad():
            visual = vlm.visual_tokens(inputs)
        n_vis = int(visual.num_tokens[0])
        counts.add(n_vis)
        # the processor expands <image> to exactly as many tokens as our layout gives, at the same place
        expected = torch.cat([ids[:p], torch.full((n_vis,), vlm.llm.image_token_id), ids[p + 1 :]])
        assert hf_inputs["input_ids"][0].tolist() == expected.tolist()
        with torch.no_grad():
            ours = vlm(inputs).logits
            theirs = hf(**hf_inputs).logits
        assert (ours - theirs).abs().max().item() <= 1e-4, img.size
        ours_tokens = vlm.generate_ids(inputs, max_new_tokens=6)
        theirs_tokens = hf.generate(**hf_inputs, max_new_tokens=6, do_sample=False)[:, expected.shape[0] :]
        assert ours_tokens.tolist() == theirs_tokens.tolist(), img.size
    assert len(counts) == len(SIZES)  # three aspect ratios, three layouts


def test_a_batch_of_aspect_ratios_equals_each_image_alone():
    vlm = anyres_vlm("clip", "mlp2x_gelu", "vicuna")
    images = [scene(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    pixels, sizes = vlm.preprocess(images)
    ids = [torch.tensor(vlm.llm.encode_prompt(PROMPT))] * len(images)
    with torch.no_grad():
        together = vlm.visual_tokens(VLMInputs(ids, pixel_values=pixels, has_image=[True] * 3, image_sizes=sizes))
        for b, img in enumerate(images):
            px, sz = vlm.preprocess([img])
            alone = vlm.visual_tokens(VLMInputs(ids[:1], pixel_values=px, has_image=[True], image_sizes=sz))
            n = int(alone.num_tokens[0])
            assert int(together.num_tokens[b]) == n
            torch.testing.assert_close(together.tokens[b, :n], alone.tokens[0, :n])
    assert vlm.max_visual_tokens() >= int(together.num_tokens.max())


def test_connectors_without_a_grid_concatenate_their_views_and_grid_connectors_unpad_at_their_grid():
    torch.manual_seed(0)
    img = scene(70, 150, 0)  # 64-px tiles: the 64x192 pinpoint keeps most pixels, 3 tiles + the global view
    q = VLM.build({"name": "clip"}, {"name": "qformer"}, {"name": "vicuna"}, tiling=tiling(64)).eval()
    assert q.tiling.image_newline is None and q.connector.output_grid(8, 8) is None
    px, sizes = q.preprocess([img])
    assert px.shape[0] == 4
    with torch.no_grad():
        merged = q.visual_tokens(VLMInputs([torch.tensor([0])], pixel_values=px, has_image=[True], image_sizes=sizes))
        per_view = q.connector(q.encode(px))
    torch.testing.assert_close(merged.tokens[0], per_view.tokens.reshape(-1, per_view.tokens.shape[-1]))

    # pixel_shuffle (factor 2) on an 8x8 patch grid: a 4x4 token grid per view; the tiles make 4x12, and a 70x150
    # image in it keeps int(150 * 4 / 70) = 8 columns (2 padded on each side): 16 global + 4 x (8 + 1) = 52
    s = VLM.build({"name": "clip"}, {"name": "pixel_shuffle"}, {"name": "vicuna"}, tiling=tiling(64)).eval()
    assert s.connector.output_grid(8, 8) == (4, 4)
    with torch.no_grad():
        out = s.visual_tokens(VLMInputs([torch.tensor([0])], pixel_values=px, has_image=[True], image_sizes=sizes))
    assert int(out.num_tokens[0]) == 16 + 4 * (8 + 1)
    torch.testing.assert_close(out.tokens[0, 16 + 8], s.tiling.image_newline)  # each row ends with the newline


def test_anyres_saves_and_loads_with_its_newline(tmp_path):
    vlm = anyres_vlm("clip", "mlp2x_gelu", "vicuna")
    vlm.save(tmp_path / "run")
    back = VLM.load(tmp_path / "run")
    assert back.specs()["tiling"] == tiling(64)
    torch.testing.assert_close(back.tiling.image_newline, vlm.tiling.image_newline)


def test_bad_tiling_settings_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="multiples of the encoder's 64-pixel input"):
        VLM.build(
            {"name": "clip"},
            {"name": "linear"},
            {"name": "vicuna"},
            tiling={"name": "anyres", "grid_pinpoints": [[64, 100]]},
        )
    with pytest.raises(ValueError, match="'anyres'"):
        VLM.build({"name": "clip"}, {"name": "linear"}, {"name": "vicuna"}, tiling={"name": "tiles"})
    vlm = anyres_vlm("clip", "linear", "vicuna")
    px, _ = vlm.preprocess([scene(70, 150, 0)])
    with pytest.raises(ValueError, match="image_sizes"):
        vlm.visual_tokens(VLMInputs([torch.tensor([0])], pixel_values=px, has_image=[True]))
    with pytest.raises(ValueError, match="4 views were encoded"):
        vlm.visual_tokens(VLMInputs([torch.tensor([0])], pixel_values=px, has_image=[True], image_sizes=[(128, 128)]))
    q = VLM.build({"name": "clip"}, {"name": "qformer"}, {"name": "vicuna"}, tiling=tiling(64))
    with pytest.raises(ExportError):
        export_hf(q, "unused")


@pytest.mark.parametrize("connector_name", BUILTIN_CONNECTORS)
def test_every_connector_trains_on_tiles_within_its_budget(encoders, llms, connector_name):
    """Each connector's ``output_grid`` says what it emits per view, and a tiled batch of two aspect ratios trains:
    finite loss, gradients on the connector (and on the newline where there is a grid), tokens within the budget."""
    enc, llm = encoders["clip"], llms["vicuna"]
    torch.manual_seed(0)
    settings = getattr(CONNECTORS.get(connector_name), "small_settings", {})
    conn = build_connector(connector_name, enc.info.hidden_size, llm.hidden_size, **settings)
    vlm = VLM(enc, conn, llm, tiling=tiling(enc.info.image_size)).train()
    images = [scene(70, 150, 0), scene(128, 128, 1)]
    pixels, sizes = vlm.preprocess(images)
    grid = conn.output_grid(*enc.info.grid)
    if grid is not None:
        with torch.no_grad():
            per_view = conn(vlm.encode(pixels))
        assert per_view.tokens.shape[1] == grid[0] * grid[1] and bool(per_view.mask.all())
    assert (vlm.tiling.image_newline is not None) == (grid is not None)
    ids = vlm.prompt_ids([True, True], ["What colour is the circle?", "How many objects?"])
    out = vlm(
        VLMInputs(ids, labels=[i.clone() for i in ids], pixel_values=pixels, has_image=[True, True], image_sizes=sizes)
    )
    assert torch.isfinite(out.loss)
    assert int(out.visual_tokens.max()) <= vlm.max_visual_tokens()
    out.loss.backward()
    trained = [p for p in vlm.connector.parameters() if p.requires_grad]
    assert not trained or any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    if grid is not None:
        assert vlm.tiling.image_newline.grad.abs().sum() > 0
    vlm.zero_grad(set_to_none=True)


def test_max_tiles_downscales_as_llava_onevision():
    """``max_tiles`` (OneVision's anyres_max_N) against ``LlavaOnevisionModel.pack_image_features``: OneVision's
    pinpoints (384 x 1..6 on each side), features of random values, sizes that stay under N views' worth of tokens
    and sizes that are resized bilinearly."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from connector_zoo.model.tiling import AnyRes
    from encoders.anyres import AnyResGeometry

    tile, patch, width = 384, 32, TINY_TOWER["hidden_size"]  # a 12x12 patch grid per view keeps the test small
    pinpoints = [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]
    vision = SiglipVisionConfig(image_size=tile, patch_size=patch, **TINY_TOWER)
    text = Qwen2Config(vocab_size=32, **TINY_TOWER)
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_grid_pinpoints=pinpoints
    )
    theirs = LlavaOnevisionModel(config).eval()
    ours = AnyRes(AnyResGeometry(tuple(map(tuple, pinpoints)), tile), width, grid=True, max_tiles=9)
    with torch.no_grad():
        ours.image_newline.copy_(theirs.image_newline)
    side = tile // patch
    resized = 0
    for h, w in [(384, 384), (768, 1152), (2000, 2300), (2304, 1000), (3000, 700), (500, 4000)]:
        views = ours.geometry.num_views(h, w)
        features = torch.randn(views, side * side, width)
        with torch.no_grad():
            packed, lens = theirs.pack_image_features([features], torch.tensor([[h, w]]), theirs.image_newline)
            mine = ours.spatial_unpad(features, (h, w), (side, side))
        assert mine.shape[0] == int(lens[0]), (h, w)
        packed = packed[0] if isinstance(packed, (list, tuple)) else packed
        torch.testing.assert_close(mine, packed, rtol=0, atol=1e-6)
        rows, cols = ours.geometry.grid(h, w)
        resized += rows * cols > 10
    assert resized >= 2  # the bilinear resize was exercised
    assert ours.spec["max_tiles"] == 9
    with pytest.raises(ValueError, match="positive integer"):
        AnyRes(ours.geometry, width, grid=True, max_tiles=0)
