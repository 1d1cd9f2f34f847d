"""The connectors that followed LLaVA-1.5 (issue 15), each against an independent computation of its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from connectors import build_connector
from connectors.prumerge import PruMerge
from connectors.visionzip import VisionZip
from encoders.base import VisionFeatures


def feats(B=2, h=24, w=24, dv=16, seed=0, cls=True) -> VisionFeatures:
    g = torch.Generator().manual_seed(seed)
    return VisionFeatures(
        torch.randn(B, h * w, dv, generator=g), torch.randn(B, dv, generator=g) if cls else None, (h, w)
    )


def identity(dim: int):
    """A ``linear`` projector that returns its input: the reducers' tokens are then the raw merged features."""
    proj = build_connector("linear", dim, dim)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.eye(dim))
        proj.proj.bias.zero_()
    return proj


def test_ldpv2_is_mlp_then_2x2_average_then_depthwise_conv_with_residual():
    torch.manual_seed(0)
    conn = build_connector("ldpv2", 16, 8).eval()
    f = feats()
    x = conn.mlp(f.patches).transpose(1, 2).reshape(2, 8, 24, 24)
    pooled = F.avg_pool2d(x, 2)  # the paper's 2x2 average pooling: 24x24 -> 12x12
    peg = F.conv2d(pooled, conn.peg.weight, conn.peg.bias, padding=1, groups=8)
    expected = (peg + pooled).flatten(2).transpose(1, 2)
    torch.testing.assert_close(conn(f).tokens, expected)
    assert conn.peg.weight.shape == (8, 1, 3, 3)  # depth-wise


@pytest.mark.parametrize("s", [2, 3])
def test_tokenpacker_each_query_sees_only_its_region(s):
    """Point-to-region: a change in one patch changes only the token of the region holding it; token 0 is the
    attention of the region's mean (bilinear downsampling at exact multiples) over the region's s*s patches."""
    torch.manual_seed(0)
    conn = build_connector("tokenpacker", 16, 8, scale_factor=s, embed_dim=32, num_heads=4, key_layers=()).eval()
    f = feats(B=1)
    base = conn(f).tokens[0]
    g = 24 // s
    for row, col in [(0, 0), (23, 23), (s, 2 * s + 1)]:
        moved = f.patches.clone()
        moved[0, row * 24 + col] += 5.0
        diff = (conn(VisionFeatures(moved, f.cls, (24, 24))).tokens[0] - base).abs().amax(-1)
        changed = (diff > 1e-6).nonzero().flatten().tolist()
        assert changed == [(row // s) * g + col // s]
    if s == 2:  # bilinear at scale 1/2 (align_corners False) is the 2x2 mean
        region = f.patches[0].reshape(24, 24, 16)[:2, :2].reshape(4, 16)
        q = conn.ln_q(conn.q_proj(region.mean(0)))[None, None]
        k, v = conn.ln_k(conn.k_proj(region))[None], conn.ln_v(conn.v_proj(region))[None]
        torch.testing.assert_close(conn.mlp(conn.attn(q, k, v)[0])[0, 0], base[0], rtol=1e-4, atol=1e-5)


def test_perceiver_resampler_by_hand_and_order_free():
    """64 latents at any grid; no position information, so permuting the patches changes nothing; one layer against
    scaled-dot-product attention over [features; latents] written out."""
    torch.manual_seed(0)
    conn = build_connector("perceiver_resampler", 16, 8, depth=1, heads=2, dim_head=8).eval()
    f = feats(B=1, h=5, w=5)
    out = conn(f).tokens
    assert out.shape == (1, 64, 8)
    perm = torch.randperm(25)
    torch.testing.assert_close(conn(VisionFeatures(f.patches[:, perm], f.cls, (5, 5))).tokens, out)
    attn, ff = conn.layers[0]
    x, lat = attn.norm_media(f.patches[0]), attn.norm_latents(conn.latents)
    kv = torch.cat([x, lat])
    k, v = attn.to_kv(kv).chunk(2, dim=-1)
    heads = lambda t: t.reshape(t.shape[0], 2, 8).transpose(0, 1)  # noqa: E731
    o = F.scaled_dot_product_attention(heads(attn.to_q(lat)), heads(k), heads(v))
    latents = attn.to_out(o.transpose(0, 1).reshape(64, 16)) + conn.latents
    latents = ff(latents) + latents
    torch.testing.assert_close(out[0], conn.proj(conn.norm(latents)), rtol=1e-4, atol=1e-5)


def test_c_abstractor_keeps_honeybees_layout_and_resamples_its_position_table():
    conn = build_connector("c_abstractor", 16, 8, hidden_size=32)
    names = {n.split(".")[0] + "." + n.split(".")[1] if "." in n else n for n, _ in conn.named_parameters()}
    assert names == {"pos_emb", "net.0", "net.2", "readout.0", "readout.2"}  # Honeybee: abstractor.net.{0,2}...
    assert [n for n, _ in conn.net[0].named_children()] == ["b1", "b2", "b3"]  # depth 3, timm RegStage blocks
    assert conn.position((24, 24)) is conn.pos_emb
    assert conn.position((27, 27)).shape == (1, 729, 16)
    assert conn(feats()).tokens.shape == (2, 144, 8) and conn(feats(h=27, w=27)).tokens.shape == (2, 144, 8)
    assert isinstance(conn.readout[1], torch.nn.SiLU)  # Honeybee's build_mlp


def test_visionzip_by_hand():
    """3x3 patches, dominant 3 (CLS + the 2 top patches), contextual 2 on the 7 others: targets are the others'
    positions 0 and 3 (step 7 // 2), each other patch joins its more similar target, token = target + mean."""
    e = torch.eye(4)
    x = torch.stack(
        [e[0], e[0] + 0.1 * e[2], 2 * e[0], e[1], 9 * e[3], e[1] * 3, e[1] + 0.2 * e[0], 7 * e[2], e[1] + 0.1 * e[3]]
    )[None]
    cls = torch.full((1, 4), 0.5)
    score = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.5, 0.05, 0.06, 0.25, 0.04])
    keys = torch.stack([x + 1.0, x - 1.0], dim=2)  # (1, 9, 2 heads, 4): their head mean is x
    f = VisionFeatures(x, cls, (3, 3), torch.stack([score, score])[None] / 2, keys=keys)
    conn = VisionZip.wrap(identity(4), dominant=3, contextual=2).eval()
    assert conn.feature_request.keys == "selected" and conn.feature_request.cls_attention
    tokens = conn(f).tokens[0]
    # others: patches 0,1,2,3,5,6,8 -> targets patches 0 and 3; 1, 2 join patch 0; 5, 6, 8 join patch 3
    expected = torch.stack(
        [cls[0], x[0, 4], x[0, 7], x[0, 0] + (x[0, 1] + x[0, 2]) / 2, x[0, 3] + (x[0, 5] + x[0, 6] + x[0, 8]) / 3]
    )
    torch.testing.assert_close(tokens, expected)
    # the similarity is the keys', not the features': keys that put patch 1 next to patch 3 move it there
    moved = keys.clone()
    moved[0, 1] = torch.stack([e[1], e[1]])
    again = conn(VisionFeatures(x, cls, (3, 3), f.cls_attention, keys=moved)).tokens[0]
    torch.testing.assert_close(
        again[3:], torch.stack([x[0, 0] + x[0, 2], x[0, 3] + (x[0, 1] + x[0, 5] + x[0, 6] + x[0, 8]) / 4])
    )
    by_features = VisionZip.wrap(identity(4), dominant=3, contextual=2, keys=False)
    assert by_features.feature_request.keys is None
    torch.testing.assert_close(
        by_features(VisionFeatures(x, cls, (3, 3), f.cls_attention, keys=moved)).tokens[0], expected
    )
    no_cls = VisionZip.wrap(identity(4), dominant=3, contextual=2)(
        VisionFeatures(x, None, (3, 3), f.cls_attention, keys=keys)
    )
    # no CLS (SigLIP): the 3 top patches, 4, 7 and 6, in raster order
    assert no_cls.tokens.shape[1] == 5 and torch.equal(no_cls.tokens[0, :3], x[0, [4, 6, 7]])


def prumerge_reference(x: np.ndarray, a: np.ndarray, keys: np.ndarray, neighbours: int) -> np.ndarray:
    """token_prune_merge_advanced's loop, in numpy (one image): ``a`` the CLS attention over the patches, ``keys`` the
    patches' keys on which the cosine similarity is measured."""
    N = len(a)
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / N
    idx = np.argsort(-a, kind="stable")[: int(N * ratio)]
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    out = []
    for i in idx:
        rest = [j for j in list(idx) + [j for j in range(N) if j not in idx] if j != i]
        sim = np.array([unit[i] @ unit[j] for j in rest])
        near = [rest[t] for t in np.argsort(-sim, kind="stable")[:neighbours]]
        out.append(x[i] + sum(a[j] * x[j] for j in near))
    pruned = [j for j in range(N) if j not in idx]
    out.append(sum(a[j] * x[j] for j in pruned))
    return np.stack(out)


def prumerge_attention(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The reference's score: ``attn = softmax(desired_layer_q @ desired_layer_k.T * C ** -0.5)``, row 0 (CLS),
    columns 1: (the patches), with q, k the full-width projections of [CLS; patches]."""
    logits = q @ k.T * q.shape[1] ** -0.5
    attn = np.exp(logits - logits.max(1, keepdims=True))
    return (attn / attn.sum(1, keepdims=True))[0, 1:]


def test_prumerge_against_the_reference_loop():
    """Scores from the CLS query and keys of the keyed block (one full-width attention row), merging by the keys'
    cosine similarity, against the reference's loop; ``keys=False`` is the per-head CLS attention + features path."""
    g = torch.Generator().manual_seed(3)
    H, Dh = 2, 3
    x = torch.randn(2, 64, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 65, H * Dh, generator=g, dtype=torch.float64)
    q = torch.randn(2, 65, H * Dh, generator=g, dtype=torch.float64)
    k[0, [4, 10, 18, 41, 42]] += 3.0 * q[0, 0]  # a few patches the CLS query likes (outliers), as in CLIP
    k[1, [1, 64]] += 4.0 * q[1, 0]
    keys = k[:, 1:].reshape(2, 64, H, Dh)
    cls_qk = torch.stack([q[:, 0], k[:, 0]], dim=1).reshape(2, 2, H, Dh)
    f = VisionFeatures(x, torch.zeros(2, 6, dtype=torch.float64), (8, 8), keys=keys, cls_qk=cls_qk)
    conn = PruMerge.wrap(identity(6).double(), neighbours=5).eval()
    assert conn.feature_request.keys == "next" and conn.feature_request.cls_attention  # the latter for SigLIP
    with torch.no_grad():
        out = conn(f)
    for b in range(2):
        a = prumerge_attention(q[b].numpy(), k[b].numpy())
        ref = prumerge_reference(x[b].numpy(), a, k[b, 1:].numpy(), 5)
        n = int(out.num_tokens[b])
        assert n == len(ref) and n > 2
        np.testing.assert_allclose(out.tokens[b, :n].numpy(), ref, rtol=1e-9, atol=1e-12)
        assert not out.mask[b, n:].any()
    fixed = PruMerge.wrap(identity(6).double(), adaptive=False, keep_ratio=0.25)(f)
    assert fixed.num_tokens.tolist() == [17, 17]  # int(64 / 4) kept + the pruned ones' weighted sum
    # keys=False: the selected layer's per-head CLS attention (mean) and the features' similarity
    att = torch.rand(2, 3, 64, generator=g, dtype=torch.float64)
    att[0, :, [3, 9, 17, 40, 41]] += 4.0
    att[1, :, [0, 63]] += 6.0
    att = att / att.sum(-1, keepdim=True)
    with torch.no_grad():
        old = PruMerge.wrap(identity(6).double(), neighbours=5, keys=False)(VisionFeatures(x, None, (8, 8), att))
    for b in range(2):
        ref = prumerge_reference(x[b].numpy(), att[b].mean(0).numpy(), x[b].numpy(), 5)
        np.testing.assert_allclose(old.tokens[b, : len(ref)].numpy(), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="keys=False"):
        conn(VisionFeatures(x, None, (8, 8), att))
    # no CLS token (SigLIP): the probe's attention scores, the keys merge
    with torch.no_grad():
        probe = conn(VisionFeatures(x, None, (8, 8), att, keys=keys))
    for b in range(2):
        ref = prumerge_reference(x[b].numpy(), att[b].mean(0).numpy(), k[b, 1:].numpy(), 5)
        np.testing.assert_allclose(probe.tokens[b, : len(ref)].numpy(), ref, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------- C-Abstractor and TokenPacker against their references
def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Known, non-trivial values for every parameter (LayerNorm gains and biases included), so that a norm, a bias
    or a residual the code forgot changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def ln_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """timm's LayerNorm2d (with its act in LayerNormAct2d, eps 1e-5): a LayerNorm over the channels of each pixel."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def regnet_bottleneck(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """timm ``regnet.Bottleneck`` as Honeybee's ``RegBlock`` builds it (stride 1, bottle_ratio 1, group_size 1, SE
    0.25, SiLU, LayerNorm2d), written from its equations:

        y   = SiLU(LN(conv1x1(x)))                    conv1, no conv bias
        y   = SiLU(LN(depthwise_conv3x3(y)))          conv2, groups = channels, padding 1
        y   = y * sigmoid(fc2(SiLU(fc1(mean_hw(y))))) squeeze-excitation (fc: 1x1 convs with bias)
        y   = LN(conv1x1(y))                          conv3, no activation
        out = SiLU(y + shortcut)                      shortcut = LN(conv1x1(x)) when the width changes, else x
    """
    w = lambda name: p[f"{prefix}.{name}"]  # noqa: E731
    y = F.silu(ln_channels(F.conv2d(x, w("conv1.conv.weight")), w("conv1.bn.weight"), w("conv1.bn.bias")))
    c = y.shape[1]
    y = F.conv2d(y, w("conv2.conv.weight"), padding=1, groups=c)
    y = F.silu(ln_channels(y, w("conv2.bn.weight"), w("conv2.bn.bias")))
    s = F.silu(F.conv2d(y.mean((2, 3), keepdim=True), w("se.fc1.weight"), w("se.fc1.bias")))
    y = y * torch.sigmoid(F.conv2d(s, w("se.fc2.weight"), w("se.fc2.bias")))
    y = ln_channels(F.conv2d(y, w("conv3.conv.weight")), w("conv3.bn.weight"), w("conv3.bn.bias"))
    if f"{prefix}.downsample.conv.weight" in p:
        shortcut = ln_channels(
            F.conv2d(x, w("downsample.conv.weight")), w("downsample.bn.weight"), w("downsample.bn.bias")
        )
    else:
        shortcut = x
    return F.silu(y + shortcut)


def c_abstractor_reference(p: dict[str, torch.Tensor], patches: torch.Tensor, side: int, depth: int, out_side: int):
    """kakaobrain/honeybee ``honeybee/projectors/projectors.py`` ``CAbstractor`` (a ``ConvProjector``): ``x += pos_emb``
    -> (B, d, h, w) -> RegStage(depth) -> AdaptiveAvgPool2d(out_side) -> RegStage(depth) -> (B, h*w, d) ->
    build_mlp(2): Linear, SiLU, Linear."""
    x = patches + p["pos_emb"]
    x = x.transpose(1, 2).reshape(x.shape[0], -1, side, side)
    for i in range(depth):
        x = regnet_bottleneck(x, p, f"net.0.b{i + 1}")
    x = F.adaptive_avg_pool2d(x, out_side)
    for i in range(depth):
        x = regnet_bottleneck(x, p, f"net.2.b{i + 1}")
    x = x.flatten(2).transpose(1, 2)
    return F.linear(
        F.silu(F.linear(x, p["readout.0.weight"], p["readout.0.bias"])), p["readout.2.weight"], p["readout.2.bias"]
    )


@pytest.mark.parametrize("depth", [1, 2])
def test_c_abstractor_computes_honeybees_c_abstractor(depth):
    """Every weight set to known values; the output equals Honeybee's CAbstractor written out from its equations
    (the position table added, the two RegNet stages around the adaptive pooling, the SiLU MLP), 8x8 -> 4 tokens."""
    conn = build_connector("c_abstractor", 16, 8, num_queries=4, hidden_size=12, depth=depth, pos_grid=8).eval()
    randomise(conn)
    f = feats(B=2, h=8, w=8)
    p = dict(conn.named_parameters())
    with torch.no_grad():
        expected = c_abstractor_reference(p, f.patches, 8, depth, 2)
        torch.testing.assert_close(conn(f).tokens, expected, rtol=1e-4, atol=1e-5)


def test_c_abstractor_initialises_as_honeybee():
    """Honeybee's ``HoneybeePreTrainedModel._init_weights`` (applied by ``post_init`` to the abstractor): every Conv2d
    and Linear weight N(0, 0.02) with zero biases, LayerNorms 1 / 0; the position table trunc-normal(0.02)."""
    torch.manual_seed(0)
    conn = build_connector("c_abstractor", 64, 96, num_queries=16, hidden_size=128, pos_grid=8)
    for name, m in conn.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert abs(m.weight.std().item() - 0.02) < 0.006 and abs(m.weight.mean().item()) < 0.005, name
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert bool((m.weight == 1).all()) and not m.bias.any(), name
    assert abs(conn.pos_emb.std().item() - 0.02) < 0.002


def tokenpacker_reference(conn, x: torch.Tensor, x_multi: torch.Tensor, raw_grid: int, s: int) -> torch.Tensor:
    """CircleRadon/TokenPacker ``llava/model/multimodal_projector/builder.py`` ``TokenPacker.forward`` on ``(x,
    x_multi)`` (the queries' layer, and the key layers' patches concatenated channel-wise as its
    ``clip_encoder.py`` ``feature_select`` builds them), sequence-first as there, its ``divide_feature`` verbatim, and
    ``nn.MultiheadAttention`` written out (in-projection, per-head softmax(q k^T / sqrt(d)) v, out-projection)."""
    p = dict(conn.named_parameters())
    E, H = conn.attn.embed_dim, conn.attn.num_heads

    def ln(t, name):
        return F.layer_norm(t, (E,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)

    def mlp(t, name):
        return F.linear(
            F.gelu(F.linear(t, p[f"{name}.0.weight"], p[f"{name}.0.bias"])), p[f"{name}.2.weight"], p[f"{name}.2.bias"]
        )

    def divide_feature(x, kernel_size, token_num, N, c):  # the reference's, line for line
        h = w = int(token_num**0.5)
        reshape_x = x.reshape(h, w, N, c).reshape(h // kernel_size, kernel_size, w, N, c)
        reshape_x = reshape_x.permute(0, 2, 1, 3, 4)
        reshape_x = reshape_x.reshape(h // kernel_size, w // kernel_size, kernel_size, kernel_size, N, c)
        reshape_x = reshape_x.permute(0, 1, 3, 2, 4, 5).reshape(
            h // kernel_size, w // kernel_size, kernel_size * kernel_size, N, c
        )
        reshape_x = reshape_x.permute(2, 0, 1, 3, 4).reshape(kernel_size * kernel_size, -1, c)
        return reshape_x

    key = ln(mlp(x_multi, "k_proj"), "ln_k").permute(1, 0, 2)
    value = ln(mlp(x_multi, "v_proj"), "ln_v").permute(1, 0, 2)
    token_num, N, c = key.shape
    g = raw_grid // s
    q = F.interpolate(x.reshape(N, raw_grid, raw_grid, -1).permute(0, 3, 1, 2), size=(g, g), mode="bilinear")
    q = q.permute(0, 2, 3, 1).reshape(N, g * g, -1)
    query = ln(F.linear(q, p["q_proj.weight"]), "ln_q").permute(1, 0, 2)
    rq = divide_feature(query, 1, g * g, N, c)  # (1, g*g*N, E)
    rk, rv = divide_feature(key, s, token_num, N, c), divide_feature(value, s, token_num, N, c)  # (s*s, g*g*N, E)
    wq, wk, wv = p["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attn.in_proj_bias"].chunk(3)
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], H, E // H).permute(1, 2, 0, 3)  # (batch, H, L, d)  # noqa: E731
    qh, kh, vh = heads(F.linear(rq, wq, bq)), heads(F.linear(rk, wk, bk)), heads(F.linear(rv, wv, bv))
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(E // H), dim=-1)
    out = (att @ vh).permute(2, 0, 1, 3).reshape(1, -1, E)  # (1, g*g*N, E)
    out = F.linear(out, p["attn.out_proj.weight"], p["attn.out_proj.bias"])
    out = out.reshape(g * g, N, -1).permute(1, 0, 2)
    return mlp(out, "mlp")


@pytest.mark.parametrize("grid,s", [(8, 2), (6, 3), (24, 2)])
def test_tokenpacker_computes_the_reference_forward(grid, s):
    """Every weight set to known values; the tokens equal the reference's forward (its region split, its order of the
    coarse queries, the attention written out) at s = 2 and 3."""
    conn = build_connector("tokenpacker", 16, 8, scale_factor=s, embed_dim=32, num_heads=4, key_layers=()).eval()
    randomise(conn, seed=1)
    f = feats(B=2, h=grid, w=grid, cls=False)
    with torch.no_grad():
        torch.testing.assert_close(
            conn(f).tokens, tokenpacker_reference(conn, f.patches, f.patches, grid, s), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("grid,s", [(8, 2), (6, 3)])
def test_tokenpacker_multi_level_keys_are_the_references(grid, s):
    """The reference's multi-level keys: k_proj / v_proj read the key layers' patches concatenated channel-wise
    (``torch.cat(image_feature_list, dim=2)``), in the order asked, while the queries come from the selected layer;
    the connector asks the encoder for exactly those layers."""
    conn = build_connector(
        "tokenpacker", 16, 8, scale_factor=s, embed_dim=32, num_heads=4, key_layers=[12, 16, 22, 23]
    ).eval()
    assert conn.k_proj[0].in_features == 4 * 16 and conn.feature_request.layers == (12, 16, 22, 23)
    randomise(conn, seed=2)
    f = feats(B=2, h=grid, w=grid, cls=False)
    g = torch.Generator().manual_seed(5)
    layers = torch.randn(2, 4, grid * grid, 16, generator=g)
    f = VisionFeatures(f.patches, None, f.grid, layers=layers)
    x_multi = torch.cat([layers[:, i] for i in range(4)], dim=2)
    with torch.no_grad():
        out = conn(f).tokens
        torch.testing.assert_close(out, tokenpacker_reference(conn, f.patches, x_multi, grid, s), rtol=1e-4, atol=1e-5)
        swapped = VisionFeatures(f.patches, None, f.grid, layers=layers[:, [1, 0, 2, 3]])
        assert (conn(swapped).tokens - out).abs().max() > 1e-3  # the order of the levels matters
    with pytest.raises(ValueError, match="needs the patch tokens of layers"):
        conn(VisionFeatures(f.patches, None, f.grid))
