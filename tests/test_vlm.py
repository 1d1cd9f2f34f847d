"""The composed model over the whole registry, plus the splice, padding, generation and save/load semantics."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILTIN_CONNECTORS, CONV_A, CONV_B, CONV_TEXT, ENCODER_NAMES, LLM_NAMES, batch, images

from connector_zoo.model.vlm import VLM, SampleTooLong, VLMInputs
from connectors import CONNECTORS, build_connector
from connectors.base import Connector, ConnectorOutput
from llms.base import IGNORE_INDEX


def small_connector(name: str, enc, llm) -> Connector:
    torch.manual_seed(0)
    settings = getattr(CONNECTORS.get(name), "small_settings", {})
    return build_connector(name, enc.info.hidden_size, llm.hidden_size, **settings)


@pytest.mark.parametrize("llm_name", LLM_NAMES)
@pytest.mark.parametrize("connector_name", BUILTIN_CONNECTORS)
@pytest.mark.parametrize("encoder_name", ENCODER_NAMES)
def test_every_combination_trains_and_generates(encoders, llms, encoder_name, connector_name, llm_name):
    enc, llm = encoders[encoder_name], llms[llm_name]
    vlm = VLM(enc, small_connector(connector_name, enc, llm), llm)
    vlm.train()
    inputs = batch(llm, [CONV_A, CONV_TEXT, CONV_B], [True, False, True], enc.preprocess(images(2)))
    out = vlm(inputs)
    assert torch.isfinite(out.loss)
    assert out.visual_tokens.shape == (2,) and (out.visual_tokens > 0).all()
    out.loss.backward()
    # gradients reach exactly the trainable parameters (the connector's; encoder and LLM frozen), each of them
    reached = {n for n, p in vlm.named_parameters() if p.grad is not None}
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {f"connector.{n}" for n, p in vlm.connector.named_parameters() if p.requires_grad}
    assert reached == trainable and any(vlm.get_parameter(n).grad.abs().sum() > 0 for n in reached)
    vlm.zero_grad(set_to_none=True)
    vlm.eval()
    # generation continues the forward pass: its first-step logits are the forward's logits at the last position
    pics = images(2)
    answers = vlm.generate(pics + [None], ["What colour?", "Describe it.", "Hello"], max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    for pic, prompt in ((pics[0], "What colour?"), (None, "Hello")):
        ids = vlm.prompt_ids([pic is not None], [prompt])
        px = enc.preprocess([pic]) if pic is not None else None
        inputs = VLMInputs(ids, pixel_values=px, has_image=[pic is not None])
        with torch.no_grad():
            last = vlm(inputs).logits[0, -1]
        gen = vlm.generate_ids(inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(gen.logits[0][0], last, rtol=1e-4, atol=1e-5)


class KeepFirst(Connector):
    """Test connector: sample b keeps its first ``counts[b]`` patch tokens (different counts per image)."""

    def __init__(self, in_dim, out_dim, counts=(5, 2)):
        super().__init__(in_dim, out_dim)
        self.proj = torch.nn.Linear(in_dim, out_dim)
        self.counts = counts

    def forward(self, features):
        tokens = self.proj(features.patches)
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool)
        for b, c in enumerate(self.counts):
            mask[b, :c] = True
        return ConnectorOutput(tokens, mask)


@pytest.mark.parametrize("llm_name", LLM_NAMES)
def test_splice_padding_and_labels_by_hand(encoders, llms, llm_name):
    enc, llm = encoders["clip"], llms[llm_name]
    torch.manual_seed(0)
    vlm = VLM(enc, KeepFirst(enc.info.hidden_size, llm.hidden_size), llm).eval()
    px = enc.preprocess(images(2))
    inputs = batch(llm, [CONV_A, CONV_TEXT, CONV_B], [True, False, True], px)
    visual = vlm.visual_tokens(inputs)
    embeds, mask, labels, _ = vlm.splice(inputs, visual)
    lengths = [len(inputs.input_ids[0]) - 1 + 5, len(inputs.input_ids[1]), len(inputs.input_ids[2]) - 1 + 2]
    assert mask.sum(1).tolist() == lengths and embeds.shape[1] == max(lengths)
    for b, (n_vis, row) in enumerate([(5, 0), (2, 1)]):
        sample = [0, 2][b]
        ids = inputs.input_ids[sample]
        p = int((ids == llm.image_token_id).nonzero())
        torch.testing.assert_close(embeds[sample, p : p + n_vis], visual.tokens[row, :n_vis])
        assert (labels[sample, p : p + n_vis] == IGNORE_INDEX).all()
        torch.testing.assert_close(labels[sample, p + n_vis : lengths[sample]], inputs.labels[sample][p + 1 :])
        torch.testing.assert_close(embeds[sample, :p], llm.embed(ids[:p]))
    # padding: masked and ignored
    for b, n in enumerate(lengths):
        assert (mask[b, n:] == 0).all() and (labels[b, n:] == IGNORE_INDEX).all()
    # each sample's logits in the padded batch equal the sample on its own
    with torch.no_grad():
        together = vlm(inputs, full_logits=True).logits
        for b, conv in enumerate([CONV_A, CONV_TEXT, CONV_B]):
            row = {0: px[:1], 2: px[1:]}.get(b)
            vlm.connector.counts = {0: (5,), 2: (2,)}.get(b, ())
            alone = vlm(batch(llm, [conv], [row is not None], row), full_logits=True).logits
            torch.testing.assert_close(together[b, : lengths[b]], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("llm_name", LLM_NAMES)
def test_batched_generation_equals_one_by_one(encoders, llms, llm_name):
    enc, llm = encoders["siglip"], llms[llm_name]
    vlm = VLM(enc, small_connector("mlp2x_gelu", enc, llm), llm).eval()
    imgs, prompts = images(2) + [None], ["What colour is the circle?", "Count.", "A longer text-only question here?"]
    together = vlm.generate(imgs, prompts, max_new_tokens=6)
    alone = [vlm.generate([im], [p], max_new_tokens=6)[0] for im, p in zip(imgs, prompts)]
    assert together == alone


def test_save_and_load_rebuild_exactly(tmp_path, encoders, llms):
    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"}).eval()
    with torch.no_grad():
        for p in vlm.connector.parameters():
            p.add_(0.01)  # differ from a fresh init
    vlm.save(tmp_path / "run")
    again = VLM.load(tmp_path / "run").eval()
    inputs = batch(vlm.llm, [CONV_A], [True], vlm.encoder.preprocess(images(1)))
    with torch.no_grad():
        torch.testing.assert_close(again(inputs).logits, vlm(inputs).logits, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "manifest.json",
        "trainable.safetensors",
        "vlm_config.json",
    ]


def test_load_rejects_wrong_shapes_and_corrupt_files(tmp_path):
    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "vicuna"})
    vlm.save(tmp_path / "run")
    with pytest.raises(ValueError, match="does not fit this model"):
        VLM.load(tmp_path / "run", connector={"name": "mlp3x_gelu"})
    (tmp_path / "run" / "trainable.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="does not match its SHA-256 in manifest.json"):
        VLM.load(tmp_path / "run")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        VLM.load(tmp_path / "run", verify=False)
    (tmp_path / "run" / "vlm_config.json").write_text("{")
    with pytest.raises(ValueError, match="vlm_config.json does not match its SHA-256"):
        VLM.load(tmp_path / "run")
    with pytest.raises(ValueError, match="not valid JSON"):
        VLM.load(tmp_path / "run", verify=False)


def test_sample_that_cannot_fit_is_reported_not_cut(encoders, llms):
    enc, llm = encoders["clip"], llms["vicuna"]
    vlm = VLM(enc, small_connector("linear", enc, llm), llm, max_length=80)
    inputs = batch(llm, [CONV_B], [True], enc.preprocess(images(1)))
    with pytest.raises(SampleTooLong, match=r"needs \d+ tokens \(64 visual\) but the LLM context budget is 80"):
        vlm(inputs)


def test_image_token_mismatch_is_an_error(encoders, llms):
    enc, llm = encoders["clip"], llms["vicuna"]
    vlm = VLM(enc, small_connector("linear", enc, llm), llm)
    with pytest.raises(ValueError, match="has an image but 0 <image> tokens"):
        vlm(batch(llm, [CONV_TEXT], [True], enc.preprocess(images(1))))
    with pytest.raises(ValueError, match="<image> token in its text but no image"):
        vlm(batch(llm, [CONV_A], [False], None))


def test_a_connector_built_directly_records_what_it_is(tmp_path):
    """Issue 33: the class records its settings, not build_connector: ``MLPConnector(Dv, D, depth=3)`` saves as a
    3-layer MLP and loads back as one (it used to record ``{"name": "mlp2x_gelu"}`` and reload with 2 layers)."""
    from connectors.mlp import MLPConnector
    from encoders import build_encoder
    from llms import build_llm

    enc, llm = build_encoder("clip"), build_llm("tinyllama")  # as VLM.load builds them
    torch.manual_seed(0)
    conn = MLPConnector(enc.info.hidden_size, llm.hidden_size, depth=3)
    assert conn.spec == {"name": "mlp2x_gelu", "depth": 3}
    vlm = VLM(enc, conn, llm).eval()
    vlm.save(tmp_path / "run")
    again = VLM.load(tmp_path / "run").eval()
    assert again.connector.depth == 3
    inputs = batch(vlm.llm, [CONV_A], [True], vlm.encoder.preprocess(images(1)))
    with torch.no_grad():
        torch.testing.assert_close(again(inputs).logits, vlm(inputs).logits, rtol=0, atol=0)


class _Unregistered(Connector):
    def __init__(self, in_dim: int, out_dim: int, scale: float = 1.0):
        super().__init__(in_dim, out_dim)
        self.proj = torch.nn.Linear(in_dim, out_dim)


def test_an_unregistered_connector_is_named_by_its_path_and_a_subclass_not_by_its_parent():
    from connectors.mlp import MLPConnector

    class Deeper(MLPConnector):
        pass

    assert _Unregistered(4, 8, scale=2.0).spec == {"name": f"{__name__}:_Unregistered", "scale": 2.0}
    assert Deeper(4, 8, depth=2).spec["name"].endswith("Deeper")
