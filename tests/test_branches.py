"""Samples of branches (``--qa-branches``): several questions about one image in one sample, each attending to the
image and to itself only. A branched sample trains exactly as its questions asked one by one (loss, gradients,
logits), the image's visual tokens computed once; a plain conversation of the same turns does not (a later question
sees the earlier answers), which is what the mask prevents."""

from __future__ import annotations

import pytest
import torch
from conftest import THREE_TURNS, images

from bench.data.formats import Sample
from bench.data.loader import branches
from connector_zoo.model.vlm import VLM, VLMInputs
from llms.attention import branch_mask, segments
from llms.base import TemplateError


def test_branch_mask_by_hand():
    """ids 0 1 2 | 3 4 | 3 4 5 | 3 4: an opening of 3 tokens (ids below the restarts' 3), the first branch (3 4)
    right after it, then two branches restarting at 3. Each sees the opening and itself, causally, never another
    branch; a row splits into samples only where the ids restart at 0."""
    pos = torch.tensor([0, 1, 2, 3, 4, 3, 4, 5, 3, 4])
    o, x = 1, 0
    expected = torch.tensor(
        [
            [o, x, x, x, x, x, x, x, x, x],
            [o, o, x, x, x, x, x, x, x, x],
            [o, o, o, x, x, x, x, x, x, x],
            [o, o, o, o, x, x, x, x, x, x],
            [o, o, o, o, o, x, x, x, x, x],
            [o, o, o, x, x, o, x, x, x, x],
            [o, o, o, x, x, o, o, x, x, x],
            [o, o, o, x, x, o, o, o, x, x],
            [o, o, o, x, x, x, x, x, o, x],
            [o, o, o, x, x, x, x, x, o, o],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(branch_mask(pos), expected)
    assert branch_mask(torch.arange(5)) is None and branch_mask(torch.tensor([0, 2, 5])) is None  # gaps: one sample
    assert segments(torch.cat([pos, torch.arange(4)])[None]) == [[(0, 10), (10, 14)]]


def test_branches_share_the_opening_and_number_each_rest_on_from_it():
    from llms import build_llm

    llm = build_llm("tinyllama")
    parts = branches(THREE_TURNS)
    assert [p[0]["content"].startswith("<image>\n") for p in parts] == [True, True, True]
    alone = [llm.encode_conversation(p) for p in parts]
    both = llm.encode_branches(parts)
    opening = next(i for i in range(len(alone[0])) if alone[0].input_ids[i] != alone[1].input_ids[i])
    assert both.input_ids[:opening] == alone[0].input_ids[:opening]
    rebuilt, at = [], opening
    for a in alone:  # each rest follows, its position ids continuing from the opening
        n = len(a) - opening
        assert both.input_ids[at : at + n] == a.input_ids[opening:] and both.labels[at : at + n] == a.labels[opening:]
        assert both.positions[at : at + n] == list(range(opening, len(a)))
        rebuilt.append(both.input_ids[:opening] + both.input_ids[at : at + n])
        at += n
    assert at == len(both) and rebuilt == [a.input_ids for a in alone]
    with pytest.raises(TemplateError, match="common opening"):
        llm.encode_branches([parts[0], parts[0]])  # nothing of the second left after the opening


def test_branches_of_an_image_without_its_own_line_and_of_turns_that_do_not_pair():
    """An image token with the question on its line (no newline) is still the image of every branch; turns that are
    not user-assistant pairs are a TemplateError (the Collator skips such a sample with that reason)."""
    inline = [{**THREE_TURNS[0], "content": "<image>What colour is the circle?"}, *THREE_TURNS[1:]]
    parts = branches(inline)
    assert [p[0]["content"] for p in parts] == [
        "<image>What colour is the circle?",
        "<image>\nHow many squares are there?",
        "<image>\nIs the triangle above the circle?",
    ]
    with pytest.raises(TemplateError, match="user-assistant pairs"):
        branches(THREE_TURNS[:-1])  # a question without its answer
    with pytest.raises(TemplateError, match="user-assistant pairs"):
        branches([{"role": "system", "content": "Be brief."}, *THREE_TURNS])


def model(attention: str | None = None) -> VLM:
    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"})
    if attention:
        vlm.llm.model.set_attn_implementation(attention)
    vlm.requires_grad_(True)
    return vlm.eval()


def inputs_of(encoded, pixels, pack: bool = True) -> VLMInputs:
    """One batch of encoded samples, each with an image (``pixels``' rows in order); a branched sample's positions."""
    positions = [None if e.positions is None else torch.tensor(e.positions) for e in encoded]
    return VLMInputs(
        [torch.tensor(e.input_ids) for e in encoded],
        [torch.tensor(e.labels) for e in encoded],
        pixel_values=pixels,
        has_image=[True] * len(encoded),
        pack=pack,
        positions=positions if any(p is not None for p in positions) else None,
    )


def run(vlm: VLM, inputs: VLMInputs):
    vlm.zero_grad()
    out = vlm(inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def test_a_sample_of_branches_trains_as_its_questions_asked_one_by_one():
    vlm = model()
    pixels = vlm.encoder.preprocess(images(2))
    parts = branches(THREE_TURNS)
    # two images: three questions about the first as branches, one plain question about the second, in one row
    tail = parts[0]
    b = vlm.llm.encode_branches(parts)
    t = vlm.llm.encode_conversation(tail)
    branched = inputs_of([b, t], pixels)
    one_by_one = inputs_of([vlm.llm.encode_conversation(p) for p in [*parts, tail]], pixels[[0, 0, 0, 1]])
    loss_b, logits_b, grads_b = run(vlm, branched)
    loss_a, logits_a, grads_a = run(vlm, one_by_one)
    assert torch.allclose(loss_b, loss_a, rtol=1e-5, atol=1e-6), (loss_b, loss_a)
    assert torch.allclose(logits_b, logits_a, atol=1e-4)  # the labelled positions' rows, in the same order
    assert grads_b.keys() == grads_a.keys() and len(grads_b) > 10
    for name in grads_b:
        assert torch.allclose(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6), name
    # the same turns as one conversation: the later questions see the earlier answers, and the numbers differ
    loss_c, _, _ = run(vlm, inputs_of([vlm.llm.encode_conversation(THREE_TURNS), t], pixels))
    assert not torch.allclose(loss_c, loss_a, rtol=1e-5, atol=1e-6), (loss_c, loss_a)


@pytest.mark.parametrize("attention,pack", [(None, False), ("eager", True)])
def test_branches_are_refused_where_the_attention_cannot_tell_them(attention, pack):
    vlm = model(attention)
    inputs = inputs_of([vlm.llm.encode_branches(branches(THREE_TURNS))], vlm.encoder.preprocess(images(1)), pack)
    with pytest.raises(ValueError, match="samples of branches"):
        vlm(inputs)


def test_the_collator_keys_a_branched_sample_apart_from_the_same_conversation():
    """Same messages, with and without ``branches``: two encodings, not one served for both."""
    from bench.data.loader import Collator
    from llms import build_llm

    llm = build_llm("tinyllama")
    collator = Collator(llm, features=None, visual_budget=4, max_length=None)
    plain = collator.encode(Sample("s", THREE_TURNS, 0, {"type": "conversation"}))
    split = collator.encode(Sample("s", THREE_TURNS, 0, {"type": "conversation", "branches": True}))
    assert plain.positions is None and split.positions is not None and split.input_ids != plain.input_ids


def test_world_questions_as_branches_and_the_flag():
    from bench.cli import COMMANDS
    from bench.cli.common import data_from_args
    from bench.cli.parser import build_parser
    from bench.data.formats import world_dataset
    from bench.data.world import World, WorldConfig

    world = World(WorldConfig().scaled(0.01), progress=False)
    data = world_dataset(world, "train", qa_turns=3, branches=True)
    convs = [s for s in data.samples if s.meta["type"] == "conversation"]
    assert convs and all(s.meta["branches"] for s in convs)
    assert not any(s.meta.get("branches") for s in world_dataset(world, "train", qa_turns=3).samples)
    parser = build_parser(COMMANDS)
    args = parser.parse_args(["run", "--qa-turns", "3", "--qa-branches"])
    assert data_from_args(args)["qa_branches"] is True
    assert "qa_branches" not in data_from_args(parser.parse_args(["run", "--qa-turns", "3"]))


def test_a_run_trains_on_fresh_questions_as_branches(tmp_path):
    """End to end: ``--qa-turns 5 --train-questions 5 --qa-branches`` trains (packed rows, said so in the log) and
    records the data settings; the run's description names them."""
    import json

    from conftest import MICRO, bench

    out = tmp_path / "run"
    proc = bench([*MICRO, "--qa-turns", "5", "--train-questions", "5", "--qa-branches", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packing: on (--qa-branches" in proc.stdout
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["qa_branches"] is True and data["train_questions"] == 5 and data["qa_turns"] == 5
