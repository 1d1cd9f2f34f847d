"""FastV through the LLM backend's visual-token hook, against FastV's own in-place algorithm written out."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import LLM_NAMES, images

from connector_zoo.model.vlm import VLM, VLMInputs
from connectors import build_connector
from llms.base import IGNORE_INDEX
from llms.hooks import row_attention


def fastv_vlm(encoders, llms, llm_name: str, **settings) -> VLM:
    enc, llm = encoders["clip"], llms[llm_name]
    torch.manual_seed(0)
    return VLM(enc, build_connector("fastv", enc.info.hidden_size, llm.hidden_size, **settings), llm).eval()


def prompt(vlm: VLM, text: str = "What colour is the circle?") -> VLMInputs:
    ids = vlm.prompt_ids([True], [text])
    return VLMInputs(ids, pixel_values=vlm.encoder.preprocess(images(1)), has_image=[True])


@pytest.mark.parametrize("llm_name", LLM_NAMES)
def test_fastv_equals_the_in_place_algorithm(encoders, llms, llm_name):
    """modeling_llama.py's fastv_forward (inplace): run K layers on everything; rank the image tokens by the head-mean
    attention of the last position in layer K; keep round(n (1 - R)), keep positions; run the remaining layers on the
    kept sequence only. Our masked version must give the same logits at every kept position."""
    K, R = 1, 0.5
    vlm = fastv_vlm(encoders, llms, llm_name, k=K, r=R)
    inputs = prompt(vlm)
    with torch.no_grad():
        visual = vlm.visual_tokens(inputs)
        embeds, _, _, _ = vlm.splice(inputs, visual)
        ours = vlm(inputs).logits[0]
        model, base = vlm.llm.model, vlm.llm.model.model
        before = model.config._attn_implementation
        model.set_attn_implementation("eager")
        full = model(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True)
        model.set_attn_implementation(before)
        s, n = int((inputs.input_ids[0] == vlm.llm.image_token_id).nonzero()[0]), visual.tokens.shape[1]
        L = embeds.shape[1]
        last_row = full.attentions[K - 1][0].mean(0)[-1]
        kept_image = (last_row[s : s + n].topk(round(n * (1 - R))).indices + s).tolist()
        keep = sorted(list(range(s)) + kept_image + list(range(s + n, L)))
        h = full.hidden_states[K][:, keep]
        position_ids = torch.tensor(keep)[None]
        position_embeddings = base.rotary_emb(h, position_ids)
        causal = torch.full((len(keep), len(keep)), torch.finfo(h.dtype).min).triu(1)[None, None]
        for layer in base.layers[K:]:
            h = layer(h, attention_mask=causal, position_embeddings=position_embeddings, position_ids=position_ids)
        reference = model.lm_head(base.norm(h))[0]
    assert len(keep) == L - n // 2
    torch.testing.assert_close(ours[keep], reference, rtol=1e-4, atol=1e-5)
    # and the pruning mattered: the plain model's logits differ
    with torch.no_grad():
        plain = model(inputs_embeds=embeds).logits[0]
    assert (plain[-1] - ours[-1]).abs().max() > 1e-4


def test_fastv_dropping_nothing_is_the_plain_model(encoders, llms):
    vlm = fastv_vlm(encoders, llms, "qwen3", k=1, r=0.0)
    inputs = prompt(vlm)
    with torch.no_grad():
        visual = vlm.visual_tokens(inputs)
        embeds, mask, _, position_ids = vlm.splice(inputs, visual)
        plain = vlm.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(vlm(inputs).logits, plain, rtol=1e-4, atol=1e-5)
    assert vlm.llm.model.config._attn_implementation != "eager" or plain is not None  # restored after the call


def test_fastv_generation_with_the_cache_equals_teacher_forcing(encoders, llms):
    """Generated tokens see the prompt's pruning through the KV cache: each step's logits equal the teacher-forced
    forward's (labels on the generated tokens put the scoring query at the last prompt token, as in generation)."""
    vlm = fastv_vlm(encoders, llms, "tinyllama", k=1, r=0.75)
    inputs = prompt(vlm)
    with torch.no_grad():
        gen = vlm.generate_ids(
            inputs, max_new_tokens=4, output_logits=True, return_dict_in_generate=True, min_new_tokens=4
        )
        new = gen.sequences[0]
        ids = torch.cat([inputs.input_ids[0], new])
        labels = torch.cat([torch.full_like(inputs.input_ids[0], IGNORE_INDEX), new])
        forced = vlm(VLMInputs([ids], [labels], inputs.pixel_values, has_image=[True]), full_logits=True).logits[0]
    n = len(new)
    steps = torch.stack([step[0] for step in gen.logits])  # (n, V)
    torch.testing.assert_close(steps, forced[-n - 1 : -1], rtol=1e-4, atol=1e-5)


def test_fastv_needs_a_later_layer(encoders, llms):
    vlm = fastv_vlm(encoders, llms, "qwen3", k=2)  # the tiny LLM has 2 layers: nothing after layer 2
    with pytest.raises(ValueError, match="must leave later layers"):
        vlm(prompt(vlm))


def mixed_batch(vlm: VLM, labelled: bool, long_text: bool = False) -> VLMInputs:
    """Rows that keep different numbers of positions: two images (one with a longer prompt) and a text-only row
    (``long_text``: the longest row, which drops nothing, so the later layers see every position of the batch)."""
    texts = [
        "What colour is the circle?",
        "How many shapes are there in this picture, and which is the largest?",
        "Say hello. " * (40 if long_text else 1),
    ]
    has_image = [True, True, False]
    ids = vlm.prompt_ids(has_image, texts)
    labels = None
    if labelled:  # teacher-forced answers: the scoring query is the token before the first label
        answer = torch.tensor(vlm.llm.tokenizer("red and round")["input_ids"])
        ids = [torch.cat([i, answer]) for i in ids]
        labels = [torch.cat([torch.full((len(i) - len(answer),), IGNORE_INDEX), answer]) for i in ids]
    return VLMInputs(ids, labels, vlm.encoder.preprocess(images(2)), has_image=has_image)


@pytest.mark.parametrize("llm_name,long_text", [("qwen3", False), ("tinyllama", False), ("tinyllama", True)])
def test_fastv_removal_equals_masking_on_a_padded_batch(encoders, llms, llm_name, long_text, monkeypatch):
    """The removal path (later layers run on the kept positions only) against the masking path (every position
    computed, the dropped ones hidden): equal logits and loss at every position that is kept, on a right-padded
    batch whose rows keep different numbers of positions; and the later layers really see fewer positions."""
    import llms.hooks as hooks

    vlm = fastv_vlm(encoders, llms, llm_name, k=1, r=0.75)
    inputs = mixed_batch(vlm, labelled=True, long_text=long_text)
    seen = []
    later = hooks.decoder_layers(vlm.llm.model)[1]
    handle = later.self_attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        removed = vlm(inputs, full_logits=True)
        masked_path = functools.partial(hooks.visual_token_hook, remove=False)
        monkeypatch.setattr("connector_zoo.model.vlm.visual_token_hook", masked_path)
        masked = vlm(inputs, full_logits=True)
    handle.remove()
    visual = vlm.visual_tokens(inputs)
    _, mask, labels, _ = vlm.splice(inputs, visual)
    S, n = mask.shape[1], int(visual.mask[0].sum())
    kept = round(n * 0.25)
    # the later layers see each row's real positions less its dropped image tokens (padding removed as well),
    # padded to the row that keeps most; the masking path computes all S
    longest = max(int(m.sum()) - (n - kept) * int(h) for m, h in zip(mask, inputs.has_image))
    assert seen == [longest, S] and (longest == S) == long_text
    starts = [
        int((i == vlm.llm.image_token_id).nonzero()[0]) if h else None
        for i, h in zip(inputs.input_ids, inputs.has_image)
    ]
    for b, s in enumerate(starts):
        real = mask[b].bool()
        if s is not None:
            real[s : s + n] = False  # image positions: dropped or not, the masking path computes them differently
        torch.testing.assert_close(removed.logits[b][real], masked.logits[b][real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(removed.loss, masked.loss, rtol=1e-5, atol=1e-6)


def test_fastv_removal_generation_equals_masking_and_shrinks_the_cache(encoders, llms, monkeypatch):
    """Left-padded batch generation: the same tokens and step logits as the masking path; the later layers' KV
    cache holds the kept prompt positions (plus padding slots for rows that keep fewer), the earlier layers all."""
    import llms.hooks as hooks

    vlm = fastv_vlm(encoders, llms, "tinyllama", k=1, r=0.75)
    inputs = mixed_batch(vlm, labelled=False)
    before = vlm.llm.model.config._attn_implementation
    caches = []
    model = vlm.llm.model
    original = model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        caches.append(out.past_key_values if hasattr(out, "past_key_values") else None)
        return out

    rows = []
    monkeypatch.setattr(hooks, "row_attention", lambda *a: rows.append(1) or row_attention(*a))
    with torch.no_grad():
        monkeypatch.setattr(model, "generate", spy)
        kw = dict(max_new_tokens=4, min_new_tokens=4, output_logits=True, return_dict_in_generate=True)
        removed = vlm.generate_ids(inputs, **kw)
        assert len(rows) == 1  # the prompt was scored from the cache's keys (the masking path scores with eager)
        monkeypatch.setattr(
            "connector_zoo.model.vlm.visual_token_hook", functools.partial(hooks.visual_token_hook, remove=False)
        )
        masked = vlm.generate_ids(inputs, **kw)
    assert model.config._attn_implementation == before
    assert torch.equal(removed.sequences, masked.sequences)
    for a, b in zip(removed.logits, masked.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    cache = caches[0]
    visual = vlm.visual_tokens(inputs)
    _, mask, _, _ = vlm.splice(inputs, visual, padding_side="left")
    S, n = mask.shape[1], int(visual.mask[0].sum())
    generated = 4 - 1  # the last token is never fed back
    first, later = (cache.layers[i].keys.shape[-2] for i in (0, 1))
    assert first == S + generated
    longest = max(int(m.sum()) - (n - round(n * 0.25)) * int(h) for m, h in zip(mask, inputs.has_image))
    assert later == longest + generated < first  # each row's real kept positions, padded to the longest


def test_fastv_refuses_gradient_checkpointing(encoders, llms):
    """Checkpointed layers are recomputed in backward, after the hook has gone: refused, not silently wrong."""
    vlm = fastv_vlm(encoders, llms, "qwen3", k=1, r=0.5).train()
    vlm.llm.model.gradient_checkpointing_enable()
    try:
        with pytest.raises(ValueError, match="activation checkpointing"):
            vlm(mixed_batch(vlm, labelled=True))
    finally:
        vlm.llm.model.gradient_checkpointing_disable()
        vlm.eval()


def test_bench_profile_compares_reducers_at_one_share(capsys):
    """`bench profile --keep`: the baseline projector and each reducer in front of it, tokens entering the LLM and
    after pruning (FastV's after its layer), a speed-up per row; bad combinations are one clear line."""
    from bench.cli import main

    args = [
        "profile",
        "--encoder-checkpoint",
        "tiny-24",
        "--connector",
        "mlp2x_gelu,fastv,cls_prune,prumerge",
        "--keep",
        "0.5",
        "--fastv-layer",
        "1",
        "--repeats",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split() and line.split()[0] in ("mlp2x_gelu", "fastv", "cls_prune", "prumerge")
    }
    assert [rows[n][1:3] for n in ("mlp2x_gelu", "fastv", "cls_prune", "prumerge")] == [
        ["576", "576"],
        ["576", "288"],
        ["288", "288"],
        ["289", "289"],
    ]
    assert rows["mlp2x_gelu"][-1] == "1.00x" and "AMX" in out
    assert main(["profile", "--connector", "mlp2x_gelu,fastv"]) == 2
    assert "give --keep" in capsys.readouterr().err
