"""Every combination as a transformers model (issue 16): save_pretrained / AutoModelForImageTextToText.from_pretrained
give the same logits and answers, generate() takes the standard generation arguments, a run directory holds the
model in this format and a fresh process loads it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import BUILTIN_CONNECTORS, MICRO, ROOT, bench, images
from transformers import AutoModelForImageTextToText

import connector_zoo.model  # noqa: F401  (registers the Auto classes)
from connector_zoo.model.modeling import ConnectorZooForConditionalGeneration
from connector_zoo.model.vlm import VLM, VLMInputs
from connectors import CONNECTORS

PROMPTS = ["What colour is the circle?", "Describe the image."]


def small_vlm(name: str) -> VLM:
    torch.manual_seed(0)
    settings = getattr(CONNECTORS.get(name), "small_settings", {})
    return VLM.build({"name": "clip"}, {"name": name, **settings}, {"name": "tinyllama"}).eval()


@pytest.mark.parametrize("name", BUILTIN_CONNECTORS)
def test_from_pretrained_gives_the_same_model(name, tmp_path):
    vlm = small_vlm(name)
    with torch.no_grad():  # a trained-looking connector: its weights moved off their initialisation
        for p in vlm.connector.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ConnectorZooForConditionalGeneration.from_vlm(vlm).save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "model.safetensors").exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "connector_zoo"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, ConnectorZooForConditionalGeneration) and not loaded.training
    px = vlm.encoder.preprocess(images(2))
    ids = vlm.prompt_ids([True, True], PROMPTS)
    with torch.no_grad():
        want = vlm(VLMInputs(ids, pixel_values=px, has_image=[True, True])).logits
        got = loaded.vlm(VLMInputs(ids, pixel_values=px, has_image=[True, True])).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert loaded.answer(images(2), PROMPTS, max_new_tokens=6) == vlm.generate(images(2), PROMPTS, max_new_tokens=6)
    # the standard entry points: padded input_ids + attention_mask + pixel_values, standard generation arguments
    padded = torch.nn.utils.rnn.pad_sequence([i.flip(0) for i in ids], batch_first=True).flip(1)  # left padding
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True).flip(1)
    for kwargs in (
        dict(max_new_tokens=5),
        dict(max_new_tokens=5, do_sample=True, top_k=5, temperature=0.7),
        dict(max_new_tokens=4, num_beams=2),
    ):
        torch.manual_seed(1)
        a = loaded.generate(input_ids=padded, attention_mask=mask, pixel_values=px, **kwargs)
        torch.manual_seed(1)
        b = vlm.generate_ids(VLMInputs(ids, pixel_values=px, has_image=[True, True]), **kwargs)
        assert torch.equal(a, b), kwargs
    out = loaded(input_ids=padded, attention_mask=mask, pixel_values=px)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)  # forward() unpads, as the model pads itself


def test_embedded_backbones_stand_alone_and_the_card_says_so(tmp_path):
    vlm = small_vlm("qformer")
    ConnectorZooForConditionalGeneration.from_vlm(vlm).save_pretrained(tmp_path / "m", embed_backbones=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["encoder"]["checkpoint"] == "encoder" and config["llm"]["checkpoint"] == "llm"
    assert (tmp_path / "m" / "encoder" / "config.json").exists() and (tmp_path / "m" / "llm" / "config.json").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert loaded.answer(images(1), PROMPTS[:1], max_new_tokens=6) == vlm.generate(
        images(1), PROMPTS[:1], max_new_tokens=6
    )
    card = (tmp_path / "m" / "README.md").read_text()
    assert "qformer connector: clip -> tinyllama" in card and "backbones are embedded" in card


def test_a_wrong_shape_or_unknown_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    vlm = small_vlm("mlp2x_gelu")
    ConnectorZooForConditionalGeneration.from_vlm(vlm).save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    key = next(iter(state))
    save_file({**state, key: torch.zeros(3, 3)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"wrong shape \\['{key}: file \\(3, 3\\) vs model"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    save_file({**state, "connector.nothing": torch.zeros(1)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="unknown \\['connector.nothing'\\]"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "m")


FRESH = """
import sys
from PIL import Image
from transformers import AutoModelForImageTextToText
import connector_zoo.model
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], allow_dotted_paths=len(sys.argv) > 4)
print(model.answer([Image.open(sys.argv[2])], [sys.argv[3]], max_new_tokens=8)[0])
from transformers import pipeline
pipe = pipeline("image-text-to-text", model=sys.argv[1], model_kwargs={"allow_dotted_paths": len(sys.argv) > 4})
chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(sys.argv[2])},
                                     {"type": "text", "text": sys.argv[3]}]}]
print(pipe(text=chat, max_new_tokens=8)[0]["generated_text"][-1]["content"].strip())
"""


@pytest.mark.slow
@pytest.mark.parametrize("connector", ["qformer", "my_connector:AvgPool2x"])
def test_a_runs_model_loads_in_a_fresh_process_and_answers_as_bench_generate(connector, tmp_path):
    """A qformer run and a plugin-connector run: from_pretrained and pipeline("image-text-to-text") on <run>/hf in a
    fresh process answer what `bench generate` answers."""
    from test_docs_and_style import readme_example

    (tmp_path / "my_connector.py").write_text(readme_example())
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    args = [*MICRO, "--out", str(tmp_path / "run")]
    args[args.index("--connector") + 1] = connector
    run = bench(args, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    hf = tmp_path / "run" / "hf"
    assert (hf / "config.json").exists() and (hf / "model.safetensors").stat().st_nlink >= 1
    images(1)[0].save(tmp_path / "pic.png")
    trust = ["--allow-dotted-paths"] if ":" in connector else []
    gen = bench(
        [
            "generate",
            str(tmp_path / "run"),
            "--image",
            str(tmp_path / "pic.png"),
            "--prompt",
            "What colour is the circle?",
            "--max-new-tokens",
            "8",
            *trust,
        ],
        env=env,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH,
            str(hf),
            str(tmp_path / "pic.png"),
            "What colour is the circle?",
            *(["trust"] if trust else []),
        ],
        cwd=tmp_path,
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    answer = gen.stdout.strip().splitlines()[-1]
    assert fresh.stdout.strip().splitlines()[-2:] == [answer, answer]  # from_pretrained, then pipeline()
    card = (hf / "README.md").read_text()
    assert "| test |" in card and "Recipe `mini`" in card and "## Reproduce" in card
    if trust:  # without the flag, a dotted path in the directory is not imported
        refused = subprocess.run(
            [sys.executable, "-c", FRESH, str(hf), str(tmp_path / "pic.png"), "x"],
            cwd=tmp_path,
            env={**__import__("os").environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert refused.returncode != 0 and "allow_dotted_paths" in refused.stderr


@pytest.mark.parametrize("llm,embed", [("tinyllama", False), ("qwen3", True), ("vicuna", False)])
def test_auto_processor_and_pipeline_answer_as_the_model(llm, embed, tmp_path):
    """AutoProcessor renders a transformers chat (content lists with an image entry) to the very prompt the
    backend builds, tokenizes it to the same ids and the image to the encoder's pixels; pipeline("image-text-to-text")
    answers what the model answers, for chat and for plain text input."""
    from transformers import AutoProcessor, pipeline

    from connector_zoo.model.processing import ConnectorZooProcessor

    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": "qformer", "num_queries": 8}, {"name": llm}).eval()
    ConnectorZooForConditionalGeneration.from_vlm(vlm).save_pretrained(tmp_path / "m", embed_backbones=embed)
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    assert isinstance(processor, ConnectorZooProcessor)
    image, question = images(1)[0], "What colour is the circle?"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    want_text = vlm.llm.render(
        [{"role": "user", "content": f"<image>\n{question}"}],
        add_generation_prompt=True,
        **vlm.llm.generation_template_kwargs,
    )
    assert text == want_text
    inputs = processor(images=[image], text=[text])
    assert inputs["input_ids"][0].tolist() == vlm.prompt_ids([True], [question])[0].tolist()
    torch.testing.assert_close(inputs["pixel_values"], vlm.encoder.preprocess([image]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 <image> token"):
        processor(images=[image, image], text=[text])
    want = vlm.generate([image], [question], max_new_tokens=6)[0]
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "m"))
    chat_with_image = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    ]
    out = pipe(text=chat_with_image, max_new_tokens=6)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    assert out[0]["generated_text"][-1]["content"].strip() == want
    plain = pipe(images=image, text=text, max_new_tokens=6, return_full_text=False)
    assert plain[0]["generated_text"].strip() == want


def test_each_processor_preprocesses_with_its_own_encoder(tmp_path):
    """Two models with different encoders loaded in one process (the processor reuses a loaded encoder by its spec):
    each directory's processor gives its own encoder's pixels (CLIP's and DINOv2's normalisations differ)."""
    from transformers import AutoProcessor

    pictures = images(2)
    pixels, loaded = {}, {}
    for enc in ("clip", "dinov2"):
        torch.manual_seed(0)
        vlm = VLM.build({"name": enc}, {"name": "mlp2x_gelu"}, {"name": "tinyllama"}).eval()
        ConnectorZooForConditionalGeneration.from_vlm(vlm).save_pretrained(tmp_path / enc)
        loaded[enc] = AutoModelForImageTextToText.from_pretrained(tmp_path / enc)  # alive: its encoder is reused
        pixels[enc] = vlm.encoder.preprocess(pictures)
    for enc in ("clip", "dinov2"):
        processor = AutoProcessor.from_pretrained(tmp_path / enc)
        assert processor.image_processor.vision_encoder() is loaded[enc].vlm.encoder  # no second copy
        got = processor(images=pictures, text=["<image>hi", "<image>ho"])
        torch.testing.assert_close(got["pixel_values"], pixels[enc], rtol=0, atol=0)
    assert not torch.equal(pixels["clip"], pixels["dinov2"])


def test_from_pretrained_takes_dtype_and_a_single_device(tmp_path):
    vlm = small_vlm("qformer")
    ConnectorZooForConditionalGeneration.from_vlm(vlm).save_pretrained(tmp_path / "m")
    half = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device_map="auto")
    assert {p.dtype for p in half.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    answer = half.answer(images(1), PROMPTS[:1], max_new_tokens=4)
    assert isinstance(answer[0], str)
    full = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", dtype="auto")
    assert {p.dtype for p in full.parameters() if p.is_floating_point()} == {torch.float32}
    with pytest.raises(ValueError, match="loads on one device"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "m", device_map="balanced")


ORDERED = """
import sys
from PIL import Image
if sys.argv[1] == "library-first":
    import connector_zoo.model  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor
else:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import connector_zoo.model  # noqa: F401
model = AutoModelForImageTextToText.from_pretrained(sys.argv[2])
processor = AutoProcessor.from_pretrained(sys.argv[2])
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sys.argv[4]}]}]
text = processor.apply_chat_template(chat, add_generation_prompt=True)
inputs = processor(images=[Image.open(sys.argv[3])], text=[text])
new = model.generate(**inputs, max_new_tokens=8)
print(processor.post_process_image_text_to_text(new)[0].strip())
"""


@pytest.mark.slow
def test_a_saved_run_loads_in_either_import_order_from_a_copy_with_the_cache_gone(tmp_path):
    """Issue 33: ``import connector_zoo.model`` before or after transformers registers the Auto classes; the run's
    ``hf/`` holds its world backbones (hard links), so a copy on another path loads after the cache that built them is
    moved away, and every file in it is readable by others (not mkdtemp's 0700 / safetensors' 0600)."""
    import os
    import shutil
    import stat

    cache = tmp_path / "cache"
    env = {"CONNECTOR_ZOO_CACHE": str(cache)}
    run = bench([*MICRO, "--out", str(tmp_path / "run")], env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    images(1)[0].save(tmp_path / "pic.png")
    question = "What colour is the circle?"
    gen = bench(
        [
            "generate",
            str(tmp_path / "run"),
            "--image",
            str(tmp_path / "pic.png"),
            "--prompt",
            question,
            "--max-new-tokens",
            "8",
        ],
        env=env,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    hf = tmp_path / "run" / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["encoder"]["checkpoint"] == "encoder" and config["llm"]["checkpoint"] == "llm"
    for path in [hf, *hf.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, f"{path} is not readable by others"
    assert str(cache) not in (hf / "config.json").read_text() + (hf / "processor_config.json").read_text()
    shutil.copytree(hf, tmp_path / "elsewhere" / "model")
    os.rename(cache, tmp_path / "moved-away")
    answers = []
    for order in ("library-first", "transformers-first"):
        fresh = subprocess.run(
            [
                sys.executable,
                "-c",
                ORDERED,
                order,
                str(tmp_path / "elsewhere" / "model"),
                str(tmp_path / "pic.png"),
                question,
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert fresh.returncode == 0, f"{order}: {fresh.stderr[-3000:]}"
        answers.append(fresh.stdout.strip().splitlines()[-1])
    assert answers == [gen.stdout.strip().splitlines()[-1]] * 2
    assert not cache.exists()  # nothing was rebuilt: the copy stood alone
