"""Sequence packing: several samples per row, position ids restarting at each, no attention across them. The loss and
the gradients equal unpacked training on the same samples, a change to one sample leaves its row-mates' logits as they
were, and the layout is first-fit by decreasing length into rows as wide as the longest sample."""

from __future__ import annotations

import pytest
import torch
from conftest import CONV_A, CONV_B, CONV_TEXT, THREE_TURNS, batch, images

from connector_zoo.model.vlm import VLM, pack_layout

SHORT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
CONVS = [CONV_A, CONV_TEXT, THREE_TURNS, SHORT, CONV_B, SHORT]
HAS_IMAGE = [True, False, True, False, True, False]


def model(connector: str, attention: str | None = None) -> VLM:
    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": connector}, {"name": "tinyllama"})
    if attention:
        vlm.llm.model.set_attn_implementation(attention)
    vlm.requires_grad_(True)  # the LLM's gradients too (stage 2)
    return vlm.eval()  # (no dropout: the two forwards see the same function)


def inputs(vlm: VLM, convs=CONVS, pack: bool = False):
    pixels = vlm.encoder.preprocess(images(sum(HAS_IMAGE)))
    out = batch(vlm.llm, convs, HAS_IMAGE, pixels)
    out.pack = pack
    return out


def test_the_layout_by_hand():
    # widths 5: the 5 opens row 0, the 4 row 1, the 3 row 2; the 2 fits row 2's tail (room 2) after rows 0 and 1
    assert pack_layout([3, 5, 2, 4]) == [(2, 0), (0, 0), (2, 3), (1, 0)]
    assert pack_layout([4, 1, 1, 1, 1]) == [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert pack_layout([7]) == [(0, 0)]


# the default (llms/attention.py's varlen sdpa: the batch in one row, each sample its own attention) and eager
# (rows as wide as the longest sample, transformers' block-diagonal mask from the position ids)
@pytest.mark.parametrize(
    "connector,attention", [("mlp2x_gelu", None), ("prumerge", None), ("qformer", None), ("mlp2x_gelu", "eager")]
)
def test_packed_loss_and_gradients_equal_unpacked(connector, attention):
    vlm = model(connector, attention)
    grads, losses, positions = [], [], []
    for pack in (False, True):
        vlm.zero_grad()
        x = inputs(vlm, pack=pack)
        for ids, labels in zip(x.input_ids, x.labels):  # a first label is never a target, packed or not
            labels[0] = ids[0]
        out = vlm(x)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None})
        positions.append(int(out.positions))
    assert positions[1] < positions[0]  # the batch really was packed: fewer rows than samples, less padding
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), losses
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, (a - b).abs().max().item())


def test_a_packed_row_rounded_up_to_a_multiple_trains_the_same_numbers():
    """``pack_multiple`` = 64: the one packed row is padded at its end to the next multiple of 64 tokens (a tail that
    is a segment of its own, without labels); the loss and every gradient equal the exact-width row's."""
    vlm = model("mlp2x_gelu")
    grads, losses, widths = [], [], []
    for multiple in (1, 64):
        vlm.pack_multiple = multiple
        vlm.zero_grad()
        x = inputs(vlm, pack=True)
        out = vlm(x)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None})
        widths.append(int(out.positions))
    assert widths[0] % 64 and widths[1] == -(-widths[0] // 64) * 64  # really rounded up, from a width that was not
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), losses
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("attention", [None, "eager"])
def test_a_change_to_one_sample_leaves_its_row_mates_logits_unchanged(attention):
    vlm = model("mlp2x_gelu", attention)
    changed = list(CONVS)
    changed[1] = [CONV_TEXT[0], {"role": "assistant", "content": "Four, or more."}]  # the text-only sample, longer
    logits, layouts = [], []
    for convs in (CONVS, changed):
        x = inputs(vlm, convs, pack=True)
        with torch.no_grad():
            logits.append(vlm(x, full_logits=True).logits)
        lengths = [len(ids) + (64 - 1 if has else 0) for ids, has in zip(x.input_ids, HAS_IMAGE)]  # <image> -> 64
        layouts.append(vlm.pack_layout(lengths)[0])
    first, second = layouts
    mates = [b for b in range(len(CONVS)) if b != 1 and first[b][0] == first[1][0]]
    assert mates, "the changed sample shares its row with another"
    for b in range(len(CONVS)):
        if b == 1:
            continue
        n = lengths[b]
        (r0, s0), (r1, s1) = first[b], second[b]
        assert torch.allclose(logits[0][r0, s0 : s0 + n], logits[1][r1, s1 : s1 + n], atol=1e-5), b


def block_causal(position_ids: torch.Tensor) -> torch.Tensor:
    """The dense mask by hand: token i sees token j when j <= i and no position restart lies in (j, i]."""
    restart = torch.zeros_like(position_ids)
    restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sample = restart.cumsum(-1)
    L = position_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return (causal & (sample[:, :, None] == sample[:, None, :]))[:, None]


def test_varlen_attention_equals_sdpa_under_the_dense_block_mask():
    """llms/attention.py against transformers' sdpa given the block-diagonal causal mask built by hand: values and
    gradients, with grouped key/value heads, two rows, and a row ending in padding (a segment of its own)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llms.attention import varlen_sdpa_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    q = torch.randn(2, 4, 10, 8, requires_grad=True)
    k = torch.randn(2, 2, 10, 8, requires_grad=True)
    v = torch.randn(2, 2, 10, 8, requires_grad=True)
    ours, _ = varlen_sdpa_forward(module, q, k, v, None, scaling=0.3, position_ids=positions)
    ref, _ = sdpa_attention_forward(module, q, k, v, block_causal(positions), scaling=0.3)
    assert ours.shape == ref.shape == (2, 10, 4, 8)
    assert torch.allclose(ours, ref, atol=1e-6)
    w = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-5)
    # and it is not plain causal attention over the row (which is what the position ids must prevent)
    plain, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_the_segments_are_read_once_per_tensor_and_again_when_it_changes():
    """The spans are kept on the position-id tensor (every layer of a forward gets the same one): a second call reads
    them from there, a tensor with equal values but other restarts (changed in place) is read again."""
    from unittest import mock

    import llms.attention as attention

    positions = torch.tensor([[0, 1, 2, 0, 1]])
    with mock.patch.object(attention, "segments", wraps=attention.segments) as read:
        assert attention.cached_segments(positions, 1)[0] == [[(0, 3), (3, 5)]]
        assert attention.cached_segments(positions, 1)[0] == [[(0, 3), (3, 5)]]
        assert read.call_count == 1
        positions[0, 3:] = torch.tensor([3, 4])  # one sample now: same shape, same tensor
        assert attention.cached_segments(positions, 1)[0] == [[(0, 5)]]
        assert attention.cached_segments(positions, 2)[0] == [[(0, 5)], [(0, 5)]]  # expanded to another batch
        other = torch.tensor([[0, 1, 2, 0, 1]])
        assert attention.cached_segments(other, 1)[0] == [[(0, 3), (3, 5)]]
        assert read.call_count == 4


def test_a_packed_row_costs_the_sum_of_its_samples():
    """The whole batch in one row, no padding: the LLM's FLOPs on the row (FlopCounterMode: matrix multiplies and
    attention) equal those of its samples run one by one, and no L x L mask is built for it."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    import llms.attention

    vlm = model("mlp2x_gelu")
    lengths = [7, 12, 3, 9]
    embeds = [torch.randn(n, vlm.llm.hidden_size) for n in lengths]
    layout, width = vlm.pack_layout(lengths)
    assert width == sum(lengths) and {row for row, _ in layout} == {0}
    row = torch.cat(embeds)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    decoder = vlm.llm.model.get_decoder()
    no_dense_mask = mock.patch.object(llms.attention, "sdpa_mask", side_effect=AssertionError("a dense mask"))
    with torch.no_grad(), no_dense_mask, FlopCounterMode(display=False) as packed:
        decoder(inputs_embeds=row, position_ids=positions, use_cache=False)
    with torch.no_grad(), FlopCounterMode(display=False) as one_by_one:
        for e in embeds:
            decoder(inputs_embeds=e[None], use_cache=False)
    assert packed.get_total_flops() == one_by_one.get_total_flops() > 0


def test_fastv_refuses_packed_rows():
    vlm = VLM.build({"name": "clip"}, {"name": "fastv"}, {"name": "tinyllama"})
    with pytest.raises(ValueError, match="cannot train on packed rows"):
        vlm(inputs(vlm, pack=True))


def test_packing_auto_packs_llava_data_and_the_pretrained_world_level_only():
    """``--packing auto``: on for LLaVA data and for the world's pretrained level (PACKED_LEVELS), off for the
    from-scratch world levels (their records were made padded) and for a connector that prunes inside the LLM; the
    explicit settings win, and ``on`` with such a connector is refused."""
    from bench.train.assemble import packing_decision
    from bench.train.settings import RunConfig

    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"})
    fastv = VLM.build({"name": "clip"}, {"name": "fastv"}, {"name": "tinyllama"})
    world = lambda level: {"kind": "world", "pretrain": {"llm_level": level}}  # noqa: E731
    assert packing_decision(RunConfig(data={"kind": "llava", "path": "x.json"}), vlm)[0] is True
    assert packing_decision(RunConfig(data=world("smollm2")), vlm)[0] is True
    for level in ("small", "wide"):
        assert packing_decision(RunConfig(data=world(level)), vlm)[0] is False
    assert packing_decision(RunConfig(), vlm) == (False, "auto: the mini world's samples are all about as long")
    assert packing_decision(RunConfig(data=world("smollm2")), fastv)[0] is False
    assert packing_decision(RunConfig(data=world("smollm2"), packing="off"), vlm) == (False, "--packing off")
    assert packing_decision(RunConfig(packing="on"), vlm) == (True, "--packing on")
    with pytest.raises(ValueError, match="prunes visual tokens inside the LLM"):
        packing_decision(RunConfig(packing="on"), fastv)


@pytest.fixture(scope="module")
def mixed_lengths(tmp_path_factory):
    """LLaVA JSON whose samples differ in length as the 665K mix does: image questions with short and long answers and
    short text-only exchanges (these fill the tails of the image samples' rows)."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(24):
        if i % 2:
            turns = [("human", "Hi?"), ("gpt", ["Hello.", "Yes.", "Sure, go on."][i % 3])]
            records.append({"id": f"t{i}", "conversations": [{"from": f, "value": v} for f, v in turns]})
            continue
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        answer = "Noise." if i % 4 else "A field of coloured noise with no object in it, seen from above, evenly lit."
        turns = [("human", "<image>\nDescribe the image."), ("gpt", answer)]
        records.append(
            {"id": f"r{i}", "image": f"{i}.png", "conversations": [{"from": f, "value": v} for f, v in turns]}
        )
    (root / "chat.json").write_text(json.dumps(records))
    return root


@pytest.mark.slow
def test_a_packed_run_trains_to_the_unpacked_losses_with_less_padding(mixed_lengths, tmp_path):
    import json

    from conftest import bench

    common = ["run", "--data", "llava", "--data-path", str(mixed_lengths / "chat.json"), "--image-folder"]
    common += [str(mixed_lengths / "images"), "--connector", "mlp2x_gelu", "--steps", "4", "--batch-size", "8"]
    common += ["--eval-limit", "2", "--held-out", "0.1", "--num-workers", "0"]
    histories = {}
    for mode in ("off", "on", "auto"):
        proc = bench([*common, "--packing", mode, "--out", str(tmp_path / mode)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((tmp_path / mode / "results.json").read_text())
        histories[mode] = [h for stage in results["loss_history"] for h in stage]
        assert f"packing: {'off' if mode == 'off' else 'on'}" in proc.stdout
    for off, on in zip(histories["off"], histories["on"]):
        assert abs(off["loss"] - on["loss"]) <= 1e-4 * abs(off["loss"]), (off, on)
        assert on["padding_share"] < off["padding_share"]
    assert [h["loss"] for h in histories["auto"]] == [h["loss"] for h in histories["on"]]  # auto: on for LLaVA data


def test_a_connectors_initialisation_does_not_depend_on_whether_the_presets_were_cached(tmp_path, monkeypatch):
    """Building a preset (it seeds its own weights) used to reset the caller's random state: the first run on a cold
    cache initialised its connector from seed 0's stream, every later run from its own seed (found when a packed and
    an unpacked run disagreed at their first step)."""
    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path / "cold"))
    states = []
    for _ in ("cold", "warm"):
        torch.manual_seed(3)
        vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"})
        states.append({k: v.clone() for k, v in vlm.connector.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_packing_composes_with_lora_and_gradient_checkpointing():
    """Stage 2 as LLaVA-1.5's LoRA recipe trains it (adapters on the LLM, activations recomputed in backward):
    packed and unpacked rows give the same loss and the same adapter and connector gradients."""
    from bench.train.settings import StageConfig
    from bench.train.stage import set_trainable

    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"})
    set_trainable(vlm, StageConfig(stage=2, lora={"r": 4, "alpha": 8, "dropout": 0.0}, gradient_checkpointing=True))
    with torch.no_grad():
        for p in vlm.llm.lora_parameters():
            p.normal_(0, 0.1)  # lora_B starts at zero: adapters that matter
    vlm.train()
    results = []
    for pack in (False, True):
        vlm.zero_grad()
        out = vlm(inputs(vlm, pack=pack))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss_u, grads_u), (loss_p, grads_p) = results
    assert torch.allclose(loss_u, loss_p, rtol=1e-5, atol=1e-6)
    assert any("lora_" in n for n in grads_u) and grads_u.keys() == grads_p.keys()
    for name in grads_u:
        assert torch.allclose(grads_u[name], grads_p[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_a_killed_packed_run_resumes_to_the_same_numbers(tmp_path):
    import json

    from conftest import MICRO, bench, computed

    packed = [*MICRO, "--packing", "on", "--save-every", "2"]
    whole = bench([*packed, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = bench([*packed, "--out", str(tmp_path / "killed")], env={"CONNECTOR_ZOO_KILL_AT": "step:2:3"})
    assert killed.returncode != 0
    resumed = bench(["run", "--resume", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "packing: on (--packing on)" in resumed.stdout and "resumed at step 2/6" in resumed.stdout
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "killed"))
    assert computed(a["loss_history"]) == computed(b["loss_history"])
    assert a["metrics"]["test"]["accuracy"] == b["metrics"]["test"]["accuracy"]


def test_a_sliding_window_model_keeps_transformers_sdpa():
    """The varlen attention knows no windows: a model with sliding-window layers stays on sdpa (packed into rows, with
    transformers' own masks), one without them switches."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from llms.attention import VARLEN, use_varlen

    chosen = []
    for window in (False, True):
        config = Qwen3Config(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, vocab_size=50, use_sliding_window=window, sliding_window=4, max_window_layers=0,
        )  # fmt: skip
        model = Qwen3ForCausalLM(config)
        model.set_attn_implementation("sdpa")
        use_varlen(model)
        chosen.append(model.config._attn_implementation)
    assert chosen == [VARLEN, "sdpa"]
