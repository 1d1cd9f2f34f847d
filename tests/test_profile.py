"""Efficiency figures: FLOP counts against the hand formula, and the profile's fields."""

from __future__ import annotations

import pytest
import torch
from conftest import images

from bench.evaluate.profile import count_flops, profile
from connector_zoo.model.vlm import VLM
from connectors import build_connector


@pytest.mark.parametrize(
    "name,formula",
    [
        ("linear", lambda n, dv, d: 2 * n * dv * d),
        ("mlp2x_gelu", lambda n, dv, d: 2 * n * dv * d + 2 * n * d * d),
        ("mlp3x_gelu", lambda n, dv, d: 2 * n * dv * d + 2 * 2 * n * d * d),
    ],
)
def test_connector_flops_equal_the_hand_formula(encoders, name, formula):
    enc = encoders["clip"]
    conn = build_connector(name, enc.info.hidden_size, 96)
    feats = enc(enc.preprocess(images(1)))
    n, dv = enc.info.num_patches, enc.info.hidden_size
    assert count_flops(lambda: conn(feats)) == formula(n, dv, 96)


@pytest.mark.parametrize("name", ["qformer", "focus_moe", "mlp2x_gelu"])
def test_profile_runs_for_other_connectors(encoders, llms, name):
    enc, llm = encoders["siglip"], llms["vicuna"]
    settings = {"qformer": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)}.get(name, {})
    vlm = VLM(enc, build_connector(name, enc.info.hidden_size, llm.hidden_size, **settings), llm)
    out = profile(vlm, images(2), repeats=1, decode_tokens=2)
    assert out["flops"]["connector"] > 0 and out["flops"]["llm_prefill"] > 0


def test_profile_reports_every_figure(encoders, llms):
    enc, llm = encoders["clip"], llms["qwen3"]
    torch.manual_seed(0)
    vlm = VLM(enc, build_connector("cls_prune", enc.info.hidden_size, llm.hidden_size, keep_ratio=0.25), llm)
    out = profile(vlm, images(3), repeats=2, decode_tokens=12)
    assert out["visual_tokens_per_image"]["per_image"] == [16, 16, 16]
    assert out["flops"]["connector"] == 2 * 16 * 64 * 64 + 2 * 16 * 64 * 64
    assert out["flops"]["llm_prefill"] > 0 and out["prefill_tokens"] > 16
    assert out["prefill_latency_ms"] > 0 and out["decode_tokens_per_second"] > 0 and out["peak_memory_bytes"] > 0
