"""AnyRes token accounting (encoders/anyres.py) against transformers' LLaVA-NeXT: the number of views against
``image_size_to_num_patches`` and the tokens of an image against what ``LlavaNextModel.pack_image_features`` returns
for features of that many views, over aspect ratios from 1:4 to 4:1, at CLIP-L/336's geometry and at a 384-pixel
encoder with the pinpoints scaled."""

from __future__ import annotations

import pytest
import torch

from encoders.anyres import DEFAULT_PINPOINTS, anyres_tokens, parse_pinpoints, parse_sizes, scaled_pinpoints

# (100, 141) and (100, 223): an odd number of padded feature columns or rows (unpad_image keeps the extra one)
SIZES = [(672, 672), (336, 336), (480, 640), (640, 480), (300, 1200), (1200, 300), (1000, 333), (517, 1033), (64, 96)]
SIZES += [(100, 141), (100, 223), (141, 100), (223, 100)]


#: the vision tower and LLM of the transformers models the layouts are checked against: width 8, one layer
TINY_TOWER = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


def llava_next(tile: int, patch: int, pinpoints):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    vision = CLIPVisionConfig(image_size=tile, patch_size=patch, **TINY_TOWER)
    text = LlamaConfig(vocab_size=32, **TINY_TOWER)
    config = LlavaNextConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_grid_pinpoints=[list(p) for p in pinpoints]
    )
    return LlavaNextModel(config).eval()


@pytest.mark.parametrize("tile,patch", [(336, 14), (384, 16)])
def test_token_counts_equal_llava_next(tile, patch):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pinpoints = scaled_pinpoints(DEFAULT_PINPOINTS, tile)
    model = llava_next(tile, patch, pinpoints)
    side = tile // patch
    for h, w in SIZES:
        ours = anyres_tokens(h, w, pinpoints, tile, side)
        views = image_size_to_num_patches((h, w), [list(p) for p in pinpoints], tile)
        assert ours["views"] == views, (h, w)
        features = [torch.zeros(views, side * side, 8)]
        with torch.no_grad():
            _, lens = model.pack_image_features(features, torch.tensor([[h, w]]), "default", model.image_newline)
        assert ours["total"] == int(lens[0]), (h, w, ours)


def test_by_hand_at_clip_l_336():
    # 672x672: the 2x2 pinpoint, 4 tiles + the global view; 48x48 features, nothing padded, 48 newlines
    assert anyres_tokens(672, 672, DEFAULT_PINPOINTS, 336, 24) == {
        "tiles": 4,
        "views": 5,
        "base": 576,
        "grid": 2304,
        "newlines": 48,
        "total": 2928,
    }
    # 336x1008 (1:3): the 1x3 pinpoint, no padding: 24 x 72 features + 24 newlines
    assert anyres_tokens(336, 1008, DEFAULT_PINPOINTS, 336, 24)["total"] == 576 + 24 * 72 + 24


def test_bad_pinpoints_and_sizes_say_what_to_write():
    assert parse_pinpoints("336x672, 672x336") == ((336, 672), (672, 336))
    with pytest.raises(ValueError, match=r"'336by672'.*HEIGHTxWIDTH"):
        parse_pinpoints("336x672,336by672")
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_sizes("672x672,672")
    with pytest.raises(ValueError, match="not a multiple"):
        anyres_tokens(672, 672, ((500, 500),), 336, 24)


def test_bench_tokens_prints_the_anyres_count(capsys):
    from bench.cli import main

    # the tiny encoder: 64-pixel views of 8x8 patches; pinpoints scaled to 64x128, ..; 672x672 -> the 2x2 grid:
    # 64 (global) + 16 x 16 (tiles) + 16 newlines
    assert main(["tokens", "--tiling", "anyres", "--image-size", "672x672,64x192", "--connector", "linear"]) == 0
    out = capsys.readouterr().out
    assert "672x672: 4 tiles + the global view = 5 views; 64 (global) + 256 (tiles, unpadded) + 16 newlines" in out
    assert "64x192: 3 tiles + the global view = 4 views; 64 (global) + 192 (tiles, unpadded) + 8 newlines = 264" in out
    assert main(["tokens", "--tiling", "anyres", "--image-size", "672"]) == 2
    assert "image size '672': expected HEIGHTxWIDTH" in capsys.readouterr().err
