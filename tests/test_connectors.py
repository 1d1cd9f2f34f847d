"""The math of each connector, against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BUILTIN_CONNECTORS, images
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    CLIPVisionModel,
)

from connector_zoo.model.vlm import VLM, VLMInputs
from connectors import build_connector
from connectors.cls_prune import CLSPrune
from connectors.focus_moe import FocusMoE
from connectors.qformer import QFormerConnector
from encoders.base import EncoderInfo, FeatureRequest, VisionFeatures

SMALL_Q = dict(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, dropout=0.0)


def feats(B=2, h=8, w=8, dv=48, cls=True, seed=0) -> VisionFeatures:
    g = torch.Generator().manual_seed(seed)
    return VisionFeatures(
        torch.randn(B, h * w, dv, generator=g), torch.randn(B, dv, generator=g) if cls else None, (h, w)
    )


# ------------------------------------------------------------------ qformer
def test_qformer_shapes_and_cross_attention_layout():
    conn = build_connector("qformer", 48, 40, **SMALL_Q)
    out = conn(feats())
    assert out.tokens.shape == (2, 32, 40) and out.num_tokens.tolist() == [32, 32]
    assert conn.cross_attention_layers() == [0, 2]
    six = build_connector("qformer", 48, 40, **dict(SMALL_Q, num_layers=6))
    assert six.cross_attention_layers() == [0, 2, 4]
    three = build_connector("qformer", 48, 40, **dict(SMALL_Q, num_layers=6, cross_attention_freq=3, num_queries=8))
    assert three.cross_attention_layers() == [0, 3] and three(feats()).tokens.shape == (2, 8, 40)
    # real-size defaults are BLIP-2's
    real = QFormerConnector.__init__.__defaults__
    assert real[:6] == (32, 768, 12, 12, 3072, 2)


def test_qformer_equals_hand_assembled_blip2_qformer():
    f = feats()
    torch.manual_seed(123)
    conn = build_connector("qformer", 48, 40, **SMALL_Q).eval()
    # the same parts, assembled by hand in the same order from the same seed
    torch.manual_seed(123)
    ln = torch.nn.LayerNorm(48)
    queries = torch.nn.Parameter(torch.zeros(1, 32, 32))
    torch.nn.init.normal_(queries, std=0.02)
    qformer = Blip2QFormerModel(
        Blip2QFormerConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            cross_attention_frequency=2,
            encoder_hidden_size=48,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).eval()
    proj = torch.nn.Linear(32, 40)
    with torch.no_grad():
        image = ln(torch.cat([f.cls[:, None], f.patches], 1))  # BLIP-2 keeps the CLS token
        ref = proj(qformer(query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state)
        torch.testing.assert_close(conn(f).tokens, ref, rtol=0, atol=1e-6)
    assert abs(float(conn.query_tokens.detach().std()) - 0.02) < 0.005


def test_qformer_gradients_reach_queries_qformer_projection_and_nothing_frozen():
    conn = build_connector("qformer", 48, 40, **SMALL_Q)
    conn(feats()).tokens.pow(2).mean().backward()
    for name in (
        "query_tokens",
        "ln_vision.weight",
        "proj.weight",
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "qformer.encoder.layer.1.attention.attention.query.weight",
    ):
        assert dict(conn.named_parameters())[name].grad.abs().sum() > 0, name
    frozen = build_connector("qformer", 48, 40, **SMALL_Q, freeze_qformer=True)
    frozen(feats()).tokens.pow(2).mean().backward()
    with_grad = {n for n, p in frozen.named_parameters() if p.grad is not None}
    assert with_grad == {"proj.weight", "proj.bias"}


def test_qformer_loads_a_blip2_checkpoint_minigpt4_style(tmp_path):
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=48
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=100,
            word_embed_proj_dim=32,
        ),
        num_query_tokens=8,
    )
    blip2 = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        blip2.vision_model.post_layernorm.weight.normal_()  # make ln_vision distinguishable from a fresh one
    blip2.save_pretrained(tmp_path / "blip2")
    conn = build_connector(
        "qformer", 48, 40, init_from=f"blip2:{tmp_path / 'blip2'}", freeze_qformer=True, dropout=0.0
    ).eval()
    assert conn.num_queries == 8 and conn.config.hidden_size == 32
    f = feats(B=2, h=4, w=4)
    with torch.no_grad():
        image = blip2.vision_model.post_layernorm(torch.cat([f.cls[:, None], f.patches], 1))
        ref = blip2.qformer(query_embeds=blip2.query_tokens.expand(2, -1, -1), encoder_hidden_states=image)
        torch.testing.assert_close(conn(f).tokens, conn.proj(ref.last_hidden_state), rtol=0, atol=1e-5)
    assert {n for n, p in conn.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}
    with pytest.raises(ValueError, match="does not fit this Q-Former"):
        build_connector("qformer", 64, 40, init_from=f"blip2:{tmp_path / 'blip2'}")


def test_qformer_initialises_from_bert_with_lavis_renames(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    conn = build_connector("qformer", 48, 40, **SMALL_Q, init_from=f"bert:{tmp_path / 'bert'}")
    q, b = conn.qformer.state_dict(), bert.state_dict()
    pairs = [
        ("encoder.layer.1.attention.attention.query.weight", "encoder.layer.1.attention.self.query.weight"),
        ("encoder.layer.2.attention.output.dense.weight", "encoder.layer.2.attention.output.dense.weight"),
        ("encoder.layer.3.intermediate_query.dense.weight", "encoder.layer.3.intermediate.dense.weight"),
        ("encoder.layer.0.output_query.LayerNorm.bias", "encoder.layer.0.output.LayerNorm.bias"),
        ("layernorm.weight", "embeddings.LayerNorm.weight"),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(q[ours], b[theirs], rtol=0, atol=0)


# ---------------------------------------------------------------- cls_prune
def test_cls_prune_keeps_the_hand_computed_top_k_in_raster_order(encoders):
    enc = encoders["clip"]
    px = enc.preprocess(images(3))
    ref = CLIPVisionModel.from_pretrained(enc.source, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(pixel_values=px, output_attentions=True, output_hidden_states=True)
    score = out.attentions[-2][:, :, 0, 1:].mean(dim=1)  # (B, N): CLS row of the selected layer, mean over heads
    expected = score.topk(16, dim=1).indices.sort(dim=1).values
    conn = build_connector("cls_prune", enc.info.hidden_size, 40, keep_ratio=0.25)
    features = enc(px, with_cls_attention=True)
    keep = conn.keep_mask(features)
    kept = torch.stack([row.nonzero().flatten() for row in keep])
    assert kept.tolist() == expected.tolist()
    patches = out.hidden_states[-2][:, 1:]
    ref_tokens = conn.inner.project(torch.stack([patches[b, expected[b]] for b in range(3)]))
    torch.testing.assert_close(conn(features).tokens, ref_tokens, rtol=0, atol=1e-5)


def test_cls_prune_ratio_count_and_keep_all():
    f = feats()
    f.cls_attention = torch.rand(2, 4, 64)
    assert build_connector("cls_prune", 48, 40, keep_ratio=0.25)(f).num_tokens.tolist() == [16, 16]
    assert build_connector("cls_prune", 48, 40, keep_tokens=10)(f).num_tokens.tolist() == [10, 10]
    assert build_connector("cls_prune", 48, 40, keep_ratio=0.05)(f).num_tokens.tolist() == [3, 3]  # round(3.2)
    # FasterVLM's counts on a 576-token grid
    assert [CLSPrune(8, 8, keep_ratio=r).num_keep(576) for r in (0.75, 0.5, 0.25, 0.1, 0.05)] == [432, 288, 144, 58, 29]
    torch.manual_seed(0)
    full = build_connector("cls_prune", 48, 40, keep_ratio=1.0)
    torch.testing.assert_close(full(f).tokens, full.inner(f).tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        build_connector("cls_prune", 48, 40, keep_ratio=1.5)


def test_cls_prune_wraps_a_trained_projector_without_new_parameters():
    f = feats()
    f.cls_attention = torch.rand(2, 4, 64)
    trained = build_connector("linear", 48, 40)
    pruned = CLSPrune.wrap(trained, keep_ratio=0.5)
    assert pruned.num_parameters() == trained.num_parameters() and pruned.inner is trained
    keep = pruned.keep_mask(f)
    torch.testing.assert_close(pruned(f).tokens, trained.project(f.patches[keep].view(2, 32, 48)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="per-token inner projector"):
        CLSPrune.wrap(build_connector("qformer", 48, 40, **SMALL_Q))


def test_cls_prune_without_a_score_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the encoder's CLS-attention scores"):
        build_connector("cls_prune", 48, 40)(feats())


def test_cls_prune_on_siglip_uses_the_probe(encoders):
    enc = encoders["siglip"]
    conn = build_connector("cls_prune", enc.info.hidden_size, 40, keep_tokens=7)
    out = conn(enc(enc.preprocess(images(2)), with_cls_attention=True))
    assert out.num_tokens.tolist() == [7, 7]


# ---------------------------------------------------------------- focus_moe
def flat_and_busy(size=64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.new("RGB", (size, size), (90, 140, 200)),
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
    ]


def std_rule_router(conn: FocusMoE, threshold: float, sharpness: float = 50.0) -> None:
    """Hand-set router: windows whose mean feature std is above ``threshold`` keep all tokens, others pool fully."""
    dv = conn.in_dim
    first, last = conn.router[0], conn.router[-1]
    with torch.no_grad():
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 2 * dv :] = 1.0 / dv  # hidden unit 0 = mean over channels of the window std
        last.weight.zero_()
        last.weight[0, 0], last.weight[-1, 0] = sharpness, -sharpness
        last.bias.zero_()
        last.bias[0], last.bias[-1] = -sharpness * threshold, sharpness * threshold


def window_std(conn: FocusMoE, features: VisionFeatures) -> torch.Tensor:
    return conn.windows(features).flatten(2, 3).std(2, unbiased=False).mean(-1)  # (B, M)


def test_focus_moe_compresses_low_information_images_more(encoders, llms):
    enc, llm = encoders["clip"], llms["vicuna"]
    conn = build_connector("focus_moe", enc.info.hidden_size, llm.hidden_size, window=4).eval()
    features = enc(enc.preprocess(flat_and_busy()))
    stds = window_std(conn, features)
    std_rule_router(conn, threshold=float((stds[0].max() + stds[1].min()) / 2))
    counts = conn(features).num_tokens.tolist()
    assert counts[0] < counts[1]
    assert counts == [4 * 1, 4 * 16]  # 4 windows: fully pooled vs kept
    # a batch whose images get different token counts runs through the composed model
    vlm = VLM(enc, conn, llm).eval()
    conv = [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "Blue."}]
    e = llm.encode_conversation(conv)
    ids, labels = torch.tensor(e.input_ids), torch.tensor(e.labels)
    out = vlm(VLMInputs([ids, ids], [labels, labels], pixel_values=enc.preprocess(flat_and_busy()), has_image=[1, 1]))
    assert out.visual_tokens.tolist() == [4, 64] and torch.isfinite(out.loss)
    assert len(vlm.generate(flat_and_busy(), ["Describe.", "Describe."], max_new_tokens=2)) == 2


# A hand computation of FocusLLaVA's vision-guided sampler on a 4x4 grid of 1-channel features (the spec's reading of
# arXiv 2411.14228; its method section was not available, see connectors/focus_moe.py). With windows X_m of 2x2
# patches, experts E_1(X_m) = X_m (4 tokens) and E_2(X_m) = AvgPool_2(X_m) (1 token), the router
#     r(X_m) = W2 GELU(W1 [mean(X_m); mean(X); std(X_m)] + b1) + b2,   GELU(x) = x Phi(x)
# picks e_m = argmax_e (r_e(X_m) + delta log |E_e(X_m)|) per window, and the image's tokens are the chosen experts'
# outputs, window by window, each through the shared projector (here 2x + 0.5).
HAND_IMAGE = [[1, 1, 0, 4], [1, 1, 4, 0], [2, 2, 1, 3], [2, 2, 5, 7]]
# windows (raster): A = [1,1,1,1] mean 1 std 0; B = [0,4,4,0] mean 2 std 2; C = [2,2,2,2] mean 2 std 0;
# D = [1,3,5,7] mean 4 std sqrt(5) = 2.236068; the global mean is 36/16 = 2.25.
# W1 = [0.5, 1, 1], b1 = -3.75 -> pre-activations A -1, B 1.5, C -0.5, D 2.736068;
# W2 = [[4], [0]], b2 = 0 -> logits (keep all, pool) = (4 GELU(pre), 0):
HAND_LOGITS = [-0.634621, 5.599157, -0.617075, 10.910247]
# A flat image of ones: every window has pre-activation 0.5 + 1 + 0 - 3.75 = -2.25 -> 4 GELU(-2.25) = -0.110020.


def hand_focus_moe() -> tuple[FocusMoE, VisionFeatures]:
    conn = build_connector("focus_moe", 1, 1, window=2, scales=(1, 2), router_hidden=1, inner="linear").eval()
    with torch.no_grad():
        conn.router[0].weight.copy_(torch.tensor([[0.5, 1.0, 1.0]]))
        conn.router[0].bias.fill_(-3.75)
        conn.router[2].weight.copy_(torch.tensor([[4.0], [0.0]]))
        conn.router[2].bias.zero_()
        conn.inner.proj.weight.fill_(2.0)
        conn.inner.proj.bias.fill_(0.5)
    patches = torch.tensor([HAND_IMAGE, [[1.0] * 4] * 4]).reshape(2, 16, 1)
    return conn, VisionFeatures(patches, None, (4, 4))


def test_focus_moe_equals_a_hand_computation():
    conn, f = hand_focus_moe()
    logits = conn.router_logits(conn.windows(f), f.patches)
    torch.testing.assert_close(logits[0, :, 0], torch.tensor(HAND_LOGITS), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, :, 0], torch.full((4,), -0.110020), rtol=0, atol=1e-5)
    # offset 0: A pooled (1), B kept (0 4 4 0), C pooled (2), D kept (1 3 5 7); the flat image pooled everywhere
    out = conn(f)
    assert out.num_tokens.tolist() == [10, 4] and out.mask.tolist()[1] == [True] * 4 + [False] * 6
    torch.testing.assert_close(out.tokens[0, :, 0], 2 * torch.tensor([1.0, 0, 4, 4, 0, 2, 1, 3, 5, 7]) + 0.5)
    torch.testing.assert_close(out.tokens[1, :4, 0], torch.full((4,), 2.5))
    assert (out.tokens[1, 4:] == 0).all()
    # delta = -6: B's keep-all logit 5.599 - 6 ln 4 < 0 (pooled: mean 2), D's 10.910 - 6 ln 4 > 0 (still kept)
    conn.offset.fill_(-6.0)
    out = conn(f)
    assert out.num_tokens.tolist() == [7, 4]
    torch.testing.assert_close(out.tokens[0, :, 0], 2 * torch.tensor([1.0, 2, 2, 1, 3, 5, 7]) + 0.5)


def test_focus_moe_calibration_lands_in_the_hand_interval():
    """Budget (7 + 4) / 2 / 16: only offsets in (-10.910247 / ln 4, -5.599157 / ln 4) = (-7.8701, -4.0389) give it."""
    conn, f = hand_focus_moe()
    conn.budget = 11 / 32
    delta = conn.calibrate(f)
    assert -7.8701 < delta < -4.0389, delta
    assert conn(f).num_tokens.tolist() == [7, 4]


def test_focus_moe_is_hard_top1_at_inference():
    conn = build_connector("focus_moe", 48, 40, window=4, router_hidden=16)
    torch.nn.init.normal_(conn.router[-1].weight)  # a router that is not uniform
    conn.offset.fill_(0.3)
    conn.eval()
    f = feats(B=3, seed=2)
    windows = conn.windows(f)
    logits = conn.router_logits(windows, f.patches) + 0.3 * conn.tokens_per_expert.log()
    choice = logits.argmax(-1)  # (B, M)
    per_expert = conn.tokens_per_expert[choice].sum(1).long()
    out = conn(f)
    assert out.num_tokens.tolist() == per_expert.tolist()
    torch.testing.assert_close(conn(f).tokens, out.tokens, rtol=0, atol=0)  # deterministic
    # the tokens are the chosen experts' pooled windows, projected, window by window
    b = 0
    experts = conn.expert_tokens(windows)
    expected = torch.cat([experts[int(e)][b, m] for m, e in enumerate(choice[b])])
    torch.testing.assert_close(out.tokens[b, : out.num_tokens[b]], conn.inner.project(expected), rtol=0, atol=1e-6)


def test_focus_moe_router_gets_gradients_from_the_lm_loss_alone():
    torch.manual_seed(0)
    conn = build_connector("focus_moe", 48, 40, window=4, budget_weight=0.0).train()
    out = conn(feats())
    out.tokens.sum().backward()  # not the budget term: the straight-through gate carries the LM gradient
    assert conn.router[0].weight.grad.abs().sum() > 0 and conn.router[-1].weight.grad.abs().sum() > 0


def regions(B: int, seed: int, h=8, w=8, dv=48, window=4) -> VisionFeatures:
    """Features whose windows differ in detail (per-window spread from e^-2 to e^2), like flat and busy regions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h, w, dv, generator=g)
    spread = torch.exp(torch.empty(B, h // window, w // window).uniform_(-2, 2, generator=g))
    x = x * spread.repeat_interleave(window, 1).repeat_interleave(window, 2)[..., None]
    return VisionFeatures(x.reshape(B, h * w, dv), None, (h, w))


@pytest.mark.parametrize("budget", [0.1, 0.4, 0.7])  # between the experts' levels (1/16, 1/4, 1)
def test_focus_moe_budget_sets_the_achieved_tokens(budget):
    """The offset is fit on the last 4 training batches (64 images): once the router settles, hard top-1 on held-out
    images meets the budget up to the sampling error of 64 images (mean over 3 seeds; measured spread +-0.035)."""
    achieved = []
    for seed in range(3):
        torch.manual_seed(seed)
        conn = build_connector("focus_moe", 48, 40, window=4, budget=budget, router_hidden=32)
        opt = torch.optim.Adam(conn.router.parameters(), lr=1e-2)
        conn.train()
        for step in range(100):
            out = conn(regions(16, seed=1000 * seed + step))
            loss = out.tokens.pow(2).mean() + out.aux_loss  # a stand-in LM loss moves the router
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():  # the router settled: four more training batches refit the offset
            for step in range(4):
                conn(regions(16, seed=1000 * seed + 500 + step))
        counts = conn.eval()(regions(512, seed=999)).num_tokens.float()
        assert counts.std() > 0  # counts differ from image to image
        achieved.append(counts.mean().item() / 64)
    assert abs(sum(achieved) / 3 - budget) < 0.04, achieved


def test_focus_moe_budget_loss_is_the_expected_count_gap():
    torch.manual_seed(0)
    conn = build_connector("focus_moe", 48, 40, window=4, budget=0.3, budget_weight=2.0).train()
    f = regions(4, seed=0)
    out = conn(f)
    logits = conn.router_logits(conn.windows(f), f.patches) + conn.offset * conn.tokens_per_expert.log()
    expected = (logits.softmax(-1) * conn.tokens_per_expert).sum((1, 2)) / 64
    torch.testing.assert_close(out.aux_loss, 2.0 * ((expected - 0.3) ** 2).mean())


def test_focus_moe_calibrate_without_training():
    torch.manual_seed(0)
    conn = build_connector("focus_moe", 48, 40, window=4, budget=0.3).eval()
    conn.calibrate(regions(64, seed=1))
    assert abs(conn(regions(64, seed=2)).num_tokens.float().mean().item() / 64 - 0.3) < 0.05


def test_focus_moe_rejects_bad_geometry():
    with pytest.raises(ValueError, match="must divide the window"):
        build_connector("focus_moe", 48, 40, window=4, scales=(1, 3))


def test_focus_moe_pads_a_grid_its_window_does_not_divide_with_edge_patches():
    """SigLIP-so400m/384's 27x27 with the default 4x4 window: 28x28 by repeating the last row and column."""
    conn = build_connector("focus_moe", 8, 16).eval()
    f = feats(B=1, h=27, w=27, dv=8)
    win = conn.windows(f)  # (1, 49, 4, 4, 8)
    grid = f.patches.reshape(27, 27, 8)
    assert win.shape == (1, 49, 4, 4, 8)
    torch.testing.assert_close(win[0, 0], grid[:4, :4])
    last = win[0, 48]  # rows 24..27, cols 24..27: the 28th row and column repeat the 27th
    torch.testing.assert_close(last[:3, :3], grid[24:, 24:])
    torch.testing.assert_close(last[3, :3], grid[26, 24:])
    torch.testing.assert_close(last[:3, 3], grid[24:, 26])
    torch.testing.assert_close(last[3, 3], grid[26, 26])


# ------------------------------------------------------------------ token counts at the real grids
def tokens_table(capsys, *args: str) -> dict[str, list[int]]:
    """`bench tokens` as a user runs it: connector -> per-image visual token counts, parsed from its table."""
    from bench.cli import main

    assert main(["tokens", *args]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        if "[" in line and "]" in line:
            name, counts = line.split()[0], line[line.index("[") + 1 : line.index("]")]
            rows[name] = [int(c) for c in counts.split(",")]
    return rows


def test_readme_token_counts_at_24x24(capsys):
    """The README's zoo table at 24x24: 576, 576, 32, 144 (keep 25 %), about 144 (budget 25 %, varying with image
    content)."""
    rows = tokens_table(
        capsys, "--encoder-checkpoint", "tiny-24", "--connector", "linear,mlp2x_gelu,qformer,cls_prune,focus_moe"
    )
    assert rows["linear"] == rows["mlp2x_gelu"] == [576] * 4 and rows["qformer"] == [32] * 4
    assert rows["cls_prune"] == [144] * 4  # round(0.25 * 576)
    moe = rows["focus_moe"]
    assert abs(sum(moe) / 4 - 144) <= 8 and len(set(moe)) > 1  # the budget on average, per image it varies
    assert all(c % 1 == 0 and 36 <= c <= 576 for c in moe)  # between all windows pooled and all kept


def test_issue15_token_counts_at_24x24(capsys):
    """`bench tokens --encoder-checkpoint tiny-24 --connector c_abstractor,...,prumerge`: the papers' counts 144,
    144, 144, 144, 64, 64 and PruMerge's adaptive count, recomputed from the encoder's CLS attention with numpy."""
    from bench.cli import demo_images
    from encoders import build_encoder

    names = "c_abstractor,ldpv2,pixel_shuffle,perceiver_resampler,visionzip,prumerge"
    rows = tokens_table(capsys, "--encoder-checkpoint", "tiny-24", "--connector", names)
    assert [rows[n] for n in names.split(",")[:-1]] == [[144] * 4] * 3 + [[64] * 4] * 2
    # TokenPacker's default key layers are CLIP-L's (hidden_states 12, 16, 22, 23 of 24 blocks): a 3-block tower
    # is told so, and gives its own levels when asked
    from bench.cli import main

    assert main(["tokens", "--encoder-checkpoint", "tiny-24", "--connector", "tokenpacker"]) == 2
    assert "layer 12 is out of range for 3 blocks" in capsys.readouterr().err
    rows.update(
        tokens_table(
            capsys,
            "--encoder-checkpoint",
            "tiny-24",
            "--connector",
            "tokenpacker",
            "--connector-arg",
            "key_layers=[1,2]",
        )
    )
    assert rows["tokenpacker"] == [144] * 4
    enc = build_encoder("clip", checkpoint="tiny-24")
    with torch.no_grad():
        f = enc(enc.preprocess(demo_images(enc.info.image_size, 4)), FeatureRequest(keys="next"))
    assert rows["prumerge"] == prumerge_count(reference_cls_attention(f))


def reference_cls_attention(f) -> torch.Tensor:
    """PruMerge's score, (B, 1, N): ``softmax(q @ k.T * C ** -0.5)[0, 1:]`` over [CLS; patches] at full width C, in
    numpy, from the keyed block's CLS query and keys."""
    out = []
    for b in range(f.batch_size):
        q = f.cls_qk[b, 0].flatten().double().numpy()
        k = np.concatenate([f.cls_qk[b, 1].flatten()[None].double().numpy(), f.keys[b].flatten(1).double().numpy()])
        logits = k @ q * len(q) ** -0.5
        a = np.exp(logits - logits.max())
        out.append(torch.from_numpy(a / a.sum())[None, 1:])
    return torch.stack(out)


def prumerge_count(attention: torch.Tensor) -> list[int]:
    """PruMerge's token count by its definition: int(N * share of IQR outliers) + 1, quartiles by numpy."""
    out = []
    for a in attention.mean(1).numpy():
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)  # the reference's outlier_dectection
        out.append(int(len(a) * ratio) + 1)
    return out


@pytest.mark.parametrize("h", [24, 27, 16])
def test_every_connector_token_count_at_real_grids(h):
    """24x24 (CLIP-L/14-336), 27x27 (SigLIP-so400m/14-384), 16x16 (CLIP-B/16-224): every connector with its
    defaults, each count from its definition (the issue-15 list: 144, 144, 144, 144, 64, 64, adaptive at 24x24)."""
    N, f = h * h, feats(B=3, h=h, w=h, dv=32)
    info = EncoderInfo(hidden_size=32, grid=(h, h), image_size=14 * h, has_cls=True, num_heads=4, num_layers=2)
    half = math.ceil(h / 2) ** 2
    f.cls_attention = torch.rand(3, 4, N, generator=torch.Generator().manual_seed(0)).pow(8).softmax(-1)
    expected = {
        "linear": [N] * 3,
        "mlp2x_gelu": [N] * 3,
        "qformer": [32] * 3,
        "cls_prune": [round(0.25 * N)] * 3,
        "random_keep": [round(0.25 * N)] * 3,
        "avgpool": [half] * 3,
        "pixel_shuffle": [half] * 3,
        "c_abstractor": [144] * 3,
        "ldpv2": [144] * 3,
        "tokenpacker": [half] * 3,
        "perceiver_resampler": [64] * 3,
        "visionzip": [64] * 3,
        "fastv": [N] * 3,  # fastv prunes in the LLM
        "prumerge": prumerge_count(f.cls_attention),
    }
    assert set(expected) | {"focus_moe"} == set(BUILTIN_CONNECTORS)
    for name in BUILTIN_CONNECTORS:
        extra = SMALL_Q if name == "qformer" else dict(hidden_size=64) if name == "c_abstractor" else {}
        # hand-made features carry no further layers or keys: the single-level / feature-similarity variants
        extra = {"tokenpacker": dict(key_layers=()), "visionzip": dict(keys=False), "prumerge": dict(keys=False)}.get(
            name, extra
        )
        conn = build_connector(name, 32, 24, **extra).eval()
        if name == "focus_moe":  # one token per window when all are pooled, every (padded) patch when all are kept
            conn.calibrate(f)
            counts = conn(f).num_tokens.tolist()
            padded = math.ceil(h / 4) * 4
            assert all(padded**2 // 16 <= c <= padded**2 for c in counts) and conn.max_tokens(info) == padded**2
            assert abs(sum(counts) / 3 - 0.25 * N) <= 0.1 * N  # the budget, calibrated on these images
        else:
            out = conn(f)
            assert out.num_tokens.tolist() == expected[name], name
            assert out.tokens.shape == (3, max(expected[name]), 24) and conn.max_tokens(info) >= max(expected[name])
            if name != "prumerge":
                assert conn.max_tokens(info) == expected[name][0], name


# ------------------------------------------------------------------ the reducers' baselines
def test_random_keep_keeps_k_random_patches_in_raster_order():
    conn = build_connector("random_keep", 48, 40, keep_ratio=0.25, inner="linear").eval()
    f = feats(B=4)
    out = conn(f)
    assert out.num_tokens.tolist() == [16] * 4
    everything = conn.inner.project(f.patches)  # (B, 64, D): each kept token must be one of these, in index order
    chosen = []
    for b in range(4):
        dist = (out.tokens[b, :, None] - everything[b, None]).abs().amax(-1)  # (16, 64)
        idx = dist.argmin(-1)
        assert (dist.min(-1).values < 1e-6).all() and (idx.diff() > 0).all()  # real patches, raster order
        chosen.append(tuple(idx.tolist()))
    assert len(set(chosen)) == 4  # a different draw per image
    torch.testing.assert_close(conn(f).tokens, out.tokens, rtol=0, atol=0)  # seeded at inference
    other = build_connector("random_keep", 48, 40, keep_ratio=0.25, inner="linear", seed=1).eval()
    other.load_state_dict(conn.state_dict())
    assert not torch.equal(other(f).tokens, out.tokens)
    conn.train()
    assert not torch.equal(conn(f).tokens, conn(f).tokens)  # training draws anew


def test_avgpool_equals_a_hand_computation():
    conn = build_connector("avgpool", 1, 1, inner="linear").eval()
    with torch.no_grad():
        conn.inner.proj.weight.fill_(1.0)
        conn.inner.proj.bias.zero_()
    grid = torch.tensor(HAND_IMAGE, dtype=torch.float32)  # 2x2 windows: means 1, 2, 2, 4 (see the focus_moe test)
    out = conn(VisionFeatures(grid.reshape(1, 16, 1), None, (4, 4)))
    torch.testing.assert_close(out.tokens[0, :, 0], torch.tensor([1.0, 2.0, 2.0, 4.0]))
    # a ratio: 24x24 with keep_ratio 1/4 -> 12x12, the 2x2 means (torch's own avg_pool2d as the reference)
    f = feats(B=2, h=24, w=24, dv=8)
    pooled = build_connector("avgpool", 8, 8, keep_ratio=0.25, inner="linear")
    reference = torch.nn.functional.avg_pool2d(f.patches.transpose(1, 2).reshape(2, 8, 24, 24), 2)
    torch.testing.assert_close(pooled(f).tokens, pooled.inner.project(reference.flatten(2).transpose(1, 2)))


@pytest.mark.parametrize("name", ["cls_prune", "random_keep", "avgpool"])
def test_reducers_wrap_a_trained_projector_without_new_parameters(name):
    from connectors import CONNECTORS

    trained = build_connector("mlp2x_gelu", 48, 40)
    reducer = CONNECTORS.get(name).wrap(trained, keep_ratio=0.5)
    assert reducer.inner is trained and reducer.num_parameters() == trained.num_parameters()
    assert reducer.spec == {"name": name, "keep_ratio": 0.5, "inner": "mlp2x_gelu"}
    f = feats()
    f.cls_attention = torch.rand(2, 4, 64).softmax(-1)
    expected = [36, 36] if name == "avgpool" else [32, 32]  # avgpool: round(8 sqrt(0.5)) = 6 per side
    assert reducer.eval()(f).num_tokens.tolist() == expected


def test_pixel_shuffle_equals_a_hand_computation():
    """r = 2 on the 4x4 grid of the focus_moe test: each 2x2 block becomes one token holding its 4 patches in raster
    order inside the block (nanoVLM's order); with an identity projector the tokens are the blocks themselves."""
    conn = build_connector("pixel_shuffle", 1, 4, factor=2, depth=1, layernorm=False)
    with torch.no_grad():
        conn.mlp[0].weight.copy_(torch.eye(4))
        conn.mlp[0].bias.zero_()
    out = conn(VisionFeatures(torch.tensor(HAND_IMAGE, dtype=torch.float32).reshape(1, 16, 1), None, (4, 4)))
    torch.testing.assert_close(out.tokens[0], torch.tensor([[1.0, 1, 1, 1], [0, 4, 4, 0], [2, 2, 2, 2], [1, 3, 5, 7]]))
    # 27x27: r = 3 divides (Idefics3 with SigLIP-so400m/384: 81 tokens); r = 2 pads to 28x28 (196)
    f = feats(B=1, h=27, w=27, dv=8)
    assert build_connector("pixel_shuffle", 8, 16, factor=3)(f).num_tokens.tolist() == [81]
    padded = build_connector("pixel_shuffle", 8, 16, factor=2, depth=1, layernorm=False)
    assert padded(f).num_tokens.tolist() == [196]
    last = padded.shuffle(f)[0, -1].reshape(4, 8)  # the bottom-right block: one real patch, three zero pads
    torch.testing.assert_close(last[0], f.patches[0, -1])
    torch.testing.assert_close(last[1:], torch.zeros(3, 8))
