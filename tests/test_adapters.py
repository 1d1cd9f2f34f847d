"""A LoRA run's adapters in peft's own format: ``PeftModel.from_pretrained`` on the base LLM (in a fresh process) and
``load_adapter`` on the unmerged Llava export give the run's own logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CONV_A, MICRO, batch, bench, images

from connector_zoo.model.vlm import ADAPTER_DIR, VLM

# a new user's script: the base LLM from the adapter's own record of it, the tokenizer saved beside the adapter
PEFT_USER = textwrap.dedent(
    """
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, ids_file, out = sys.argv[1:]
    base_path = json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    base.resize_token_embeddings(len(tokenizer))  # the run added <image> (and <pad>): the adapter holds those rows
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.load(ids_file)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out)
    print("lora modules:", sum("lora_A" in n for n, _ in model.named_modules()))
    """
)


def tiny_lora_vlm() -> VLM:
    torch.manual_seed(0)
    vlm = VLM.build({"name": "clip"}, {"name": "mlp2x_gelu"}, {"name": "tinyllama", "lora": {"r": 4, "alpha": 8}})
    with torch.no_grad():
        for p in vlm.llm.lora_parameters():
            p.normal_(0, 0.2)  # adapters that change the output (lora_B starts at zero)
    return vlm.eval()


@pytest.mark.slow
def test_a_lora_runs_adapter_loads_with_peft_in_a_fresh_process_to_the_runs_logits(tmp_path):
    run = tmp_path / "lora"
    proc = bench([*MICRO, "--lora", "r=4,alpha=8,dropout=0.0", "--out", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = run / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert (run / "stage2" / "checkpoint-last" / ADAPTER_DIR / "adapter_model.safetensors").exists()
    vlm = VLM.load(run).eval()
    ids = torch.tensor([vlm.llm.encode_conversation(CONV_A).input_ids])
    with torch.no_grad():
        ours = vlm.llm.model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", PEFT_USER, str(adapter), str(tmp_path / "ids.pt"), str(tmp_path / "theirs.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    assert "lora modules: 0" not in proc.stdout
    assert theirs.shape == ours.shape and (ours - theirs).abs().max().item() <= 1e-5
    # the trained adapters changed the output: without them the logits differ
    with torch.no_grad(), vlm.llm.model.disable_adapter():
        plain = vlm.llm.model(input_ids=ids).logits
    assert (plain - ours).abs().max().item() > 1e-3


def test_an_unmerged_llava_export_loads_its_adapter_to_the_models_logits(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from connector_zoo.model.llava import export_hf

    vlm = tiny_lora_vlm()
    inputs = batch(vlm.llm, [CONV_A], [True], vlm.encoder.preprocess(images(1)))
    with torch.no_grad():
        ours = vlm(inputs, full_logits=True).logits
        with vlm.llm.model.disable_adapter():
            base = vlm(inputs, full_logits=True).logits
    export_hf(vlm, tmp_path / "llava", merge=False)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    ids = inputs.input_ids[0]
    p = int((ids == vlm.llm.image_token_id).nonzero())
    n = vlm.encoder.info.num_patches
    expanded = torch.cat([ids[:p], torch.full((n,), vlm.llm.image_token_id), ids[p + 1 :]])[None]

    def logits():
        with torch.no_grad():
            return hf(input_ids=expanded, pixel_values=inputs.pixel_values).logits

    assert (logits() - base).abs().max().item() <= 1e-4  # the base weights, unmerged
    hf.load_adapter(str(tmp_path / "llava" / ADAPTER_DIR))
    adapted = [n for n, m in hf.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(n.startswith("model.language_model.") for n in adapted)  # not the vision tower's q_proj
    assert (logits() - ours).abs().max().item() <= 1e-4
    assert (ours - base).abs().max().item() > 1e-3


def test_export_hf_no_merge_on_the_command_line(tmp_path):
    vlm = tiny_lora_vlm()
    vlm.save(tmp_path / "run")
    assert (tmp_path / "run" / ADAPTER_DIR / "adapter_config.json").exists()
    proc = bench(["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-merge"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "adapters unmerged" in proc.stdout and (tmp_path / "out" / ADAPTER_DIR / "adapter_model.safetensors").exists()
    )
    proc = bench(["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert proc.returncode == 0 and not (tmp_path / "merged" / ADAPTER_DIR).exists()
