"""Encoders: the selected layer, CLS handling, CLS attention, preprocessing, frozen, and loading by local path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ENCODER_NAMES, images, install_in_hf_cache
from transformers import CLIPVisionModel, Dinov2WithRegistersModel, SiglipVisionModel

from encoders import build_encoder


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_contract_shapes_and_frozen(encoders, name):
    enc = encoders[name]
    feats = enc.encode_images(images(3), with_cls_attention=True)
    h, w = enc.info.grid
    assert feats.patches.shape == (3, h * w, enc.info.hidden_size)
    assert feats.grid == (h, w)
    assert (feats.cls is None) == (name in ("siglip", "fused"))  # fused: one of its parts (SigLIP) has no CLS
    assert feats.cls_attention.shape == (3, enc.info.num_heads, h * w)
    assert not feats.patches.requires_grad
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # a frozen encoder stays in eval mode


def test_clip_penultimate_layer_and_cls_split_match_transformers(encoders):
    enc = encoders["clip"]
    px = enc.preprocess(images(2))
    ref = CLIPVisionModel.from_pretrained(enc.model.name_or_path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True, output_attentions=True)
    feats = enc(px, with_cls_attention=True)
    torch.testing.assert_close(feats.patches, out.hidden_states[-2][:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.cls, out.hidden_states[-2][:, 0], rtol=0, atol=1e-6)
    # the CLS query row over patch keys, of the same layer whose output is hidden_states[-2]
    torch.testing.assert_close(feats.cls_attention, out.attentions[-2][:, :, 0, 1:], rtol=0, atol=1e-6)
    # not the post-layernormed last layer
    assert not torch.allclose(feats.patches, out.last_hidden_state[:, 1:])


def test_siglip_never_drops_a_token(encoders):
    enc = encoders["siglip"]
    px = enc.preprocess(images(2))
    ref = SiglipVisionModel.from_pretrained(enc.model.name_or_path).eval()
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
    feats = enc(px, with_cls_attention=True)
    assert feats.patches.shape[1] == enc.info.num_patches == out.hidden_states[-2].shape[1]
    torch.testing.assert_close(feats.patches, out.hidden_states[-2], rtol=0, atol=1e-6)


def test_siglip_probe_attention_equals_hand_computation(encoders):
    """The pruning score of SigLIP: the attention-pooling head's learned probe (one query) over the post-layernormed
    last-layer patches, per head, softmax(q k^T / sqrt(d_head)) with q, k from the head's in-projection."""
    enc = encoders["siglip"]
    px = enc.preprocess(images(2))
    ref = SiglipVisionModel.from_pretrained(enc.model.name_or_path).eval()
    head = getattr(ref, "vision_model", ref).head  # transformers 5 flattened SiglipVisionModel
    with torch.no_grad():
        x = ref(pixel_values=px).last_hidden_state  # after post_layernorm, the head's input
        D, H = x.shape[-1], head.attention.num_heads
        wq, wk, _ = head.attention.in_proj_weight.split(D)
        bq, bk, _ = head.attention.in_proj_bias.split(D)
        q = (head.probe @ wq.T + bq).reshape(1, 1, H, D // H).transpose(1, 2)  # (1, H, 1, d)
        k = (x @ wk.T + bk).reshape(2, -1, H, D // H).transpose(1, 2)  # (B, H, N, d)
        probs = (q @ k.transpose(-1, -2) / (D // H) ** 0.5).softmax(-1)[:, :, 0]  # (B, H, N)
    feats = enc(px, with_cls_attention=True)
    torch.testing.assert_close(feats.cls_attention, probs, rtol=0, atol=1e-6)
    assert not torch.allclose(probs[:, 0], probs[:, 0].mean(-1, keepdim=True))  # not uniform: a real score


def test_eva_block_features_match_a_manual_forward(encoders):
    enc = encoders["eva-vit-g"]
    m = enc.model
    px = enc.preprocess(images(2))
    with torch.no_grad():
        x = m.patch_embed(px)
        x, rope = m._pos_embed(x)
        for blk in m.blocks[: len(m.blocks) - 1]:  # output of the penultimate block = hidden_states[-2]
            x = blk(x, rope=rope)
        # hand computation of the last-used block's attention row: softmax(q k^T / sqrt(d)) of the CLS query
        blk = m.blocks[len(m.blocks) - 2]
    feats = enc(px, with_cls_attention=True)
    torch.testing.assert_close(feats.patches, x[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats.cls, x[:, 0], rtol=0, atol=1e-5)
    assert feats.cls_attention.shape[-1] == enc.info.num_patches
    assert blk is m.blocks[enc.block]


def test_eva_cls_attention_equals_hand_computation(encoders):
    enc = encoders["eva-vit-g"]
    m = enc.model
    px = enc.preprocess(images(1))
    with torch.no_grad():
        x, rope = m._pos_embed(m.patch_embed(px))
        for blk in m.blocks[: enc.block]:
            x = blk(x, rope=rope)
        attn = m.blocks[enc.block].attn
        y = m.blocks[enc.block].norm1(x)
        qkv = (
            attn.qkv(y)
            if attn.q_bias is None
            else torch.nn.functional.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        )
        B, N, _ = y.shape
        q, k, _v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    feats = enc(px, with_cls_attention=True)
    torch.testing.assert_close(feats.cls_attention, probs[:, :, 0, 1:], rtol=0, atol=1e-6)


def reference_hidden_states(name: str, enc, px: torch.Tensor) -> list[torch.Tensor]:
    """hidden_states[0..L] (embeddings, then each block's output) from an independent forward: transformers' own
    model class for CLIP/SigLIP (patch tokens only), timm's blocks one by one for EVA."""
    with torch.no_grad():
        if name == "eva-vit-g":
            m = enc.model
            x, rope = m._pos_embed(m.patch_embed(px))
            states = [x]
            for blk in m.blocks:
                x = blk(x, rope=rope)
                states.append(x)
            return [h[:, 1:] for h in states]
        if name == "fused":  # each part on its own three channels, concatenated
            parts = [reference_hidden_states(p.registered_name, p, x) for p, x in zip(enc.parts, px.split(3, dim=1))]
            return [torch.cat(hs, dim=-1) for hs in zip(*parts)]
        if name == "dinov2":  # [CLS, 4 registers, patches]: the patches
            out = Dinov2WithRegistersModel.from_pretrained(enc.model.name_or_path).eval()(
                pixel_values=px, output_hidden_states=True
            )
            assert enc.model.config.num_register_tokens == 4
            return [h[:, 5:] for h in out.hidden_states]
        cls = CLIPVisionModel if name == "clip" else SiglipVisionModel
        out = cls.from_pretrained(enc.model.name_or_path).eval()(pixel_values=px, output_hidden_states=True)
        return [h[:, 1:] if name == "clip" else h for h in out.hidden_states]


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_layer_selection_is_hidden_states_k_for_every_k(name, encoders):
    enc = encoders[name]
    px = enc.preprocess(images(2))
    states = reference_hidden_states(name, enc, px)
    L = len(states) - 1
    assert L >= 2
    for k in [*range(1, L + 1), *range(-1, -L - 1, -1)]:
        got = build_encoder(name, checkpoint=enc.checkpoint, layer=k)(px).patches
        torch.testing.assert_close(got, states[k], rtol=0, atol=1e-5, msg=f"{name} layer {k}")
    for bad in (0, L + 1, -L - 1):
        with pytest.raises(ValueError, match="out of range"):
            build_encoder(name, layer=bad)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_loads_by_hub_id_from_an_existing_hf_cache(name, encoders, tmp_path, monkeypatch):
    """A checkpoint already in the Hugging Face cache loads by its hub id with HF_HUB_OFFLINE=1, and gives the
    features transformers' own class gives from the files (a different loader on the other side)."""
    enc = encoders[name]
    hub_id = f"connector-zoo-tests/{name}-tiny"
    install_in_hf_cache(Path(enc.source), hub_id, tmp_path / "hub", monkeypatch)
    loaded = build_encoder(name, checkpoint=hub_id)
    px = loaded.preprocess(images(2))
    torch.testing.assert_close(loaded(px).patches, reference_hidden_states(name, enc, px)[-2], rtol=0, atol=1e-6)
    with pytest.raises(OSError, match="neither a local directory nor in the Hugging Face cache"):
        build_encoder(name, checkpoint="connector-zoo-tests/not-in-the-cache")


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_missing_checkpoint_says_what_to_do(name, tmp_path):
    with pytest.raises(OSError, match="neither a local directory nor in the Hugging Face cache"):
        build_encoder(name, checkpoint="nobody/no-such-model-xyz")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="not a valid"):
        build_encoder(name, checkpoint=str(tmp_path))


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_pooled_features_is_pooled_and_forward_in_one_pass(name):
    """What the mini world's pretraining scores: ``pooled_features`` gives the same pooled embedding and patch tokens
    as ``pooled`` and ``forward`` called apart, with gradients to the tower; every tower runs once (its patch
    embedding is called once: a fused encoder's parts once each)."""
    enc = build_encoder(name, frozen=False)
    px = enc.preprocess(images(2))
    calls = []
    embedders = [m for n, m in enc.named_modules() if n.rsplit(".", 1)[-1] in ("embeddings", "patch_embed")]
    assert len(embedders) == (2 if name == "fused" else 1)
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in embedders]
    pooled, features = enc.pooled_features(px)
    for h in handles:
        h.remove()
    assert len(calls) == len(embedders)
    torch.testing.assert_close(pooled, enc.pooled(px), rtol=0, atol=1e-6)
    torch.testing.assert_close(features.patches, enc(px).patches, rtol=0, atol=1e-6)
    (pooled.sum() + features.patches.sum()).backward()
    # every weight learns but DINOv2's mask token (used only for masked-image modelling)
    assert [n for n, p in enc.named_parameters() if p.grad is None and "mask_token" not in n] == []


def test_cache_key_tracks_what_determines_features(encoders):
    enc = encoders["clip"]
    assert enc.cache_key() == build_encoder("clip").cache_key()
    assert enc.cache_key() != build_encoder("clip", layer=-1).cache_key()
    assert enc.cache_key() != encoders["siglip"].cache_key()


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_tiny_preset_at_another_resolution_grows_the_grid(name):
    if name == "fused":
        enc = build_encoder(name, checkpoint="dinov2:tiny@128+siglip:tiny@128")
        assert enc.info.grid == (16, 16) and enc.encode_images(images(1, size=128)).patches.shape == (1, 256, 128)
        return
    enc = build_encoder(name, checkpoint="tiny@128")
    assert enc.info.grid == (16, 16) and enc.info.image_size == 128
    assert enc.encode_images(images(1, size=128)).patches.shape[1] == 256
    with pytest.raises(ValueError, match="multiple of the tiny preset's patch size 8"):
        build_encoder(name, checkpoint="tiny@100")


def test_dinov2_drops_registers_and_reads_the_cls_row(encoders, tmp_path):
    """With registers: CLS attention is the eager attention's CLS row over the patches (registers skipped). A plain
    DINOv2 checkpoint (model type dinov2, no registers) loads through AutoModel; ``dir@R`` runs at R pixels with the
    position embeddings interpolated, as transformers' Dinov2Model does on that input."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    enc = encoders["dinov2"]
    px = enc.preprocess(images(2))
    ref = Dinov2WithRegistersModel.from_pretrained(enc.model.name_or_path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(pixel_values=px, output_attentions=True, output_hidden_states=True)
    feats = enc(px, with_cls_attention=True)
    torch.testing.assert_close(feats.cls_attention, out.attentions[-2][:, :, 0, 5:], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.cls, out.hidden_states[-2][:, 0], rtol=0, atol=1e-6)
    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64, patch_size=8
        )
    ).save_pretrained(tmp_path / "plain")
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        tmp_path / "plain"
    )
    plain = build_encoder("dinov2", checkpoint=str(tmp_path / "plain"))
    assert plain.registers == 0 and plain.info.grid == (8, 8)
    big = build_encoder("dinov2", checkpoint=f"{tmp_path / 'plain'}@96")
    assert big.info.grid == (12, 12) and big.info.image_size == 96
    px96 = big.preprocess(images(1, size=120))
    assert px96.shape[-1] == 96
    with torch.no_grad():
        want = Dinov2Model.from_pretrained(tmp_path / "plain").eval()(pixel_values=px96, output_hidden_states=True)
    torch.testing.assert_close(big(px96).patches, want.hidden_states[-2][:, 1:], rtol=0, atol=1e-6)


def test_fused_concatenates_its_parts_on_a_common_grid():
    """Prismatic's dinosiglip layout: each part reads its own channels; a part on another grid is resampled."""
    import torch.nn.functional as F

    fused = build_encoder("fused", checkpoint="dinov2:tiny@96+siglip:tiny-24")  # 12x12 and 24x24, both 96 px
    dino, sig = fused.parts
    assert fused.info.grid == (12, 12) and fused.info.hidden_size == 128
    pics = images(2, size=96)
    px = fused.preprocess(pics)
    assert px.shape == (2, 6, 96, 96)
    torch.testing.assert_close(px[:, :3], dino.preprocess(pics))
    torch.testing.assert_close(px[:, 3:], sig.preprocess(pics))
    feats = fused(px, with_cls_attention=True)
    s = sig(px[:, 3:]).patches.transpose(1, 2).reshape(2, 64, 24, 24)
    resampled = F.interpolate(s, size=(12, 12), mode="bilinear").flatten(2).transpose(1, 2)
    torch.testing.assert_close(feats.patches[..., :64], dino(px[:, :3]).patches)
    torch.testing.assert_close(feats.patches[..., 64:], resampled)
    assert feats.cls is None and feats.cls_attention.shape == (2, 4, 144)  # DINOv2's CLS row
    with pytest.raises(ValueError, match="must agree"):
        build_encoder("fused", checkpoint="dinov2:tiny+siglip:tiny-24")
    with pytest.raises(ValueError, match="name:checkpoint"):
        build_encoder("fused", checkpoint="dinov2+siglip:tiny")
