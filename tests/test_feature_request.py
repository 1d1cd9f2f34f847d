"""The encoder contract's further layers and attention keys (issue 31, item 6), for every encoder family, against
the towers' own computations: transformers' ``hidden_states``, timm's intermediates, and each tower's own CLS
attention (which the keys and the CLS query must reproduce); and the feature cache keyed by the request."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_NAMES, images
from test_data import write_llava_fixture

from bench.data.features import FeatureCache
from bench.data.formats import llava_json
from encoders import build_encoder
from encoders.base import FeatureRequest


def hidden_states(enc, px) -> list[torch.Tensor]:
    """The tower's own hidden states (index 0: embeddings, i: block i's output), whole sequence, from its library."""
    if enc.registered_name == "eva-vit-g":
        blocks = list(range(enc.info.num_layers))
        out = enc.model.forward_intermediates(
            px, indices=blocks, return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
        )
        return [None] + [torch.cat([prefix, patches], dim=1) for patches, prefix in out]
    return list(enc.model(pixel_values=px, output_hidden_states=True).hidden_states)


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2", "eva-vit-g"])
def test_further_layers_are_the_towers_hidden_states(encoders, name):
    enc = encoders[name]
    px = enc.preprocess(images(2))
    n, P = enc.info.num_layers, enc.prefix_tokens
    with torch.no_grad():
        want = hidden_states(enc, px)
    feats = enc(px, FeatureRequest(layers=(1, -1, -2)))
    assert feats.layers.shape == (2, 3, enc.info.num_patches, enc.info.hidden_size)
    for j, index in enumerate((1, n, n - 1)):
        torch.testing.assert_close(feats.layers[:, j], want[index][:, P:], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.patches, want[n - 1][:, P:], rtol=0, atol=1e-6)  # the selected layer unchanged
    assert feats.keys is None and feats.cls_attention is None  # only what was asked
    with pytest.raises(ValueError, match="out of range"):
        enc(px, FeatureRequest(layers=(n + 1,)))


def renormalised(attention: torch.Tensor) -> torch.Tensor:
    """CLS attention over the patches, renormalised over them (the registers' share taken out, for DINOv2)."""
    return attention / attention.sum(-1, keepdim=True)


def attention_from(feats) -> torch.Tensor:
    """softmax over the patches of q_CLS . k_patch / sqrt(Dh), per head, from the contract's keys and CLS query."""
    q = feats.cls_qk[:, 0]  # (B, H, Dh)
    logits = torch.einsum("bhd,bnhd->bhn", q.float(), feats.keys.float()) * q.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("name", ["clip", "dinov2", "eva-vit-g"])
def test_keys_and_cls_query_reproduce_the_towers_own_attention(encoders, name):
    """The selected block's keys and CLS query give exactly the CLS attention the tower computes in that block;
    the next block's give the attention the tower computes there (read from a tower whose selected layer is -1)."""
    enc = encoders[name]
    px = enc.preprocess(images(2))
    H, Dh = enc.key_shape()
    feats = enc(px, FeatureRequest(cls_attention=True, keys="selected"))
    assert feats.keys.shape == (2, enc.info.num_patches, H, Dh) and feats.cls_qk.shape == (2, 2, H, Dh)
    torch.testing.assert_close(attention_from(feats), renormalised(feats.cls_attention), rtol=1e-4, atol=1e-6)
    nxt = enc(px, FeatureRequest(keys="next"))
    last = build_encoder(name, checkpoint=enc.source if name != "eva-vit-g" else enc.checkpoint, layer=-1)
    torch.testing.assert_close(attention_from(nxt), renormalised(last(px, True).cls_attention), rtol=1e-4, atol=1e-6)
    assert (nxt.keys - feats.keys).abs().max() > 1e-2  # another block, other keys
    with pytest.raises(ValueError, match="it is the last"):
        last(px, FeatureRequest(keys="next"))


def test_siglip_keys_are_its_key_projection_of_the_normed_input(encoders):
    """SigLIP has no CLS token (no CLS query): its keys, checked against k_proj(layer_norm1(hidden_states[b]))."""
    enc = encoders["siglip"]
    px = enc.preprocess(images(2))
    feats = enc(px, FeatureRequest(keys="next"))
    block = enc.blocks()[enc.layer_block(enc.layer) + 1]
    with torch.no_grad():
        h = hidden_states(enc, px)[enc.layer_block(enc.layer) + 1]
        k = block.self_attn.k_proj(block.layer_norm1(h))
    H, Dh = enc.key_shape()
    torch.testing.assert_close(feats.keys, k.unflatten(-1, (H, Dh)), rtol=0, atol=1e-6)
    assert feats.cls_qk is None


def test_fused_gives_every_parts_layers_and_one_parts_keys():
    fused = build_encoder("fused", checkpoint="dinov2:tiny@96+siglip:tiny-24")
    dino, sig = fused.parts
    px = fused.preprocess(images(2, size=96))
    feats = fused(px, FeatureRequest(layers=(1,), keys="selected"))
    assert feats.layers.shape == (2, 1, 144, 128)
    torch.testing.assert_close(feats.layers[:, 0, :, :64], dino(px[:, :3], FeatureRequest(layers=(1,))).layers[:, 0])
    own = dino(px[:, :3], FeatureRequest(keys="selected"))
    torch.testing.assert_close(feats.keys, own.keys)  # DINOv2's: the part on the common grid
    torch.testing.assert_close(feats.cls_qk, own.cls_qk)
    assert fused.request_layout(FeatureRequest(keys="selected"))["keys"] == (144, *dino.key_shape())


def test_the_cache_is_keyed_by_the_request(tmp_path, encoders):
    """Requests that differ (the layers' order, which block's keys) never share a cache; the same ask spelled two
    ways (-2 and its positive index) does; a cached row equals the direct computation in every field."""
    path, folder = write_llava_fixture(tmp_path)
    ds = llava_json(path, folder)
    enc = encoders["clip"]
    n = enc.info.num_layers
    root = tmp_path / "feat"
    dirs = {
        ask: FeatureCache(enc, ds.images, ask, root=root).dir
        for ask in (
            FeatureRequest(layers=(1, 2)),
            FeatureRequest(layers=(2, 1)),
            FeatureRequest(keys="selected"),
            FeatureRequest(keys="next"),
            FeatureRequest(cls_attention=True),
            FeatureRequest(),
        )
    }
    assert len(set(dirs.values())) == len(dirs)
    assert (
        FeatureCache(enc, ds.images, FeatureRequest(layers=(-2,)), root=root).dir
        == FeatureCache(enc, ds.images, FeatureRequest(layers=(n - 1,)), root=root).dir
    )
    assert FeatureCache(enc, ds.images, True, root=root).dir.name.endswith("+attn")  # the older caches' name
    ask = FeatureRequest(cls_attention=True, layers=(2, 1), keys="next")
    cache = FeatureCache(enc, ds.images, ask, root=root)
    first = cache.get([0, 1])
    again = FeatureCache(enc, ds.images, ask, root=root)
    stored = again.get([1, 0])
    assert again.forwards == 0
    direct = enc.encode_images([ds.images.load(1)], ask)
    for field in ("patches", "cls", "cls_attention", "layers", "keys", "cls_qk"):
        torch.testing.assert_close(getattr(stored, field)[:1], getattr(direct, field), rtol=0, atol=1e-6)
        assert torch.equal(getattr(stored, field)[1], getattr(first, field)[0])


def test_a_request_is_checked():
    with pytest.raises(ValueError, match="keys must be"):
        FeatureRequest(keys="previous")
    with pytest.raises(ValueError, match="integers"):
        FeatureRequest(layers=("12",))


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_every_family_answers_every_request(encoders, name):
    enc = encoders[name]
    feats = enc.encode_images(images(1), FeatureRequest(cls_attention=True, layers=(1, -2), keys="selected"))
    layout = enc.request_layout(FeatureRequest(cls_attention=True, layers=(1, -2), keys="selected"))
    for field, shape in layout.items():
        assert tuple(getattr(feats, field).shape[1:]) == shape, field
