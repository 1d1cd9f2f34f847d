"""The connectors that followed LLaVA-1.5 (issue 15), each against an independent computation of its definition."""

from __future__ import annotations

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
    return VisionFeatures(torch.randn(B, h * w, dv, generator=g), torch.randn(B, dv, generator=g) if cls else None,
                          (h, w))  # fmt: skip


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
    conn = build_connector("tokenpacker", 16, 8, scale_factor=s, embed_dim=32, num_heads=4).eval()
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
    x = torch.stack([e[0], e[0] + 0.1 * e[2], 2 * e[0], e[1], 9 * e[3], e[1] * 3, e[1] + 0.2 * e[0], 7 * e[2],
                     e[1] + 0.1 * e[3]])[None]  # fmt: skip
    cls = torch.full((1, 4), 0.5)
    score = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.5, 0.05, 0.06, 0.25, 0.04])
    f = VisionFeatures(x, cls, (3, 3), torch.stack([score, score])[None] / 2)
    conn = VisionZip.wrap(identity(4), dominant=3, contextual=2).eval()
    tokens = conn(f).tokens[0]
    # others: patches 0,1,2,3,5,6,8 -> targets patches 0 and 3; 1, 2 join patch 0; 5, 6, 8 join patch 3
    expected = torch.stack([cls[0], x[0, 4], x[0, 7], x[0, 0] + (x[0, 1] + x[0, 2]) / 2,
                            x[0, 3] + (x[0, 5] + x[0, 6] + x[0, 8]) / 3])  # fmt: skip
    torch.testing.assert_close(tokens, expected)
    no_cls = VisionZip.wrap(identity(4), dominant=3, contextual=2)(VisionFeatures(x, None, (3, 3), f.cls_attention))
    # no CLS (SigLIP): the 3 top patches, 4, 7 and 6, in raster order
    assert no_cls.tokens.shape[1] == 5 and torch.equal(no_cls.tokens[0, :3], x[0, [4, 6, 7]])


def prumerge_reference(x: np.ndarray, a: np.ndarray, neighbours: int) -> np.ndarray:
    """token_prune_merge_advanced's loop, in numpy, with the features as keys (one image)."""
    N = len(a)
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / N
    idx = np.argsort(-a, kind="stable")[: int(N * ratio)]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in idx:
        rest = [j for j in list(idx) + [j for j in range(N) if j not in idx] if j != i]
        sim = np.array([unit[i] @ unit[j] for j in rest])
        near = [rest[t] for t in np.argsort(-sim, kind="stable")[:neighbours]]
        out.append(x[i] + sum(a[j] * x[j] for j in near))
    pruned = [j for j in range(N) if j not in idx]
    out.append(sum(a[j] * x[j] for j in pruned))
    return np.stack(out)


def test_prumerge_against_the_reference_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 6, generator=g, dtype=torch.float64)
    att = torch.rand(2, 3, 64, generator=g, dtype=torch.float64)
    att[0, :, [3, 9, 17, 40, 41]] += 4.0  # a few outliers, as CLIP's CLS attention has
    att[1, :, [0, 63]] += 6.0
    att = att / att.sum(-1, keepdim=True)
    f = VisionFeatures(x, None, (8, 8), att)
    with torch.no_grad():
        out = PruMerge.wrap(identity(6).double(), neighbours=5).eval()(f)
    for b in range(2):
        ref = prumerge_reference(x[b].numpy(), att[b].mean(0).numpy(), 5)
        n = int(out.num_tokens[b])
        assert n == len(ref) and n > 2
        np.testing.assert_allclose(out.tokens[b, :n].numpy(), ref, rtol=1e-9, atol=1e-12)
        assert not out.mask[b, n:].any()
    fixed = PruMerge.wrap(identity(6).double(), adaptive=False, keep_ratio=0.25)(f)
    assert fixed.num_tokens.tolist() == [17, 17]  # int(64 / 4) kept + the pruned ones' weighted sum
