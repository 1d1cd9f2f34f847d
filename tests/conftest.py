"""Test setup: offline, a private cache for the tiny presets, and session-wide built components."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

# before anything imports transformers or builds a preset. The suite always uses a cache of its own (never the
# developer's ~/.cache/connector_zoo or an exported CONNECTOR_ZOO_CACHE): nothing built by other code leaks in.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# pytest-xdist runs the suite in worker processes (pyproject's addopts: -n 2): they share the controller's cache (made
# here before it starts them; the cache's locks are what concurrent runs rely on anyway) and take one thread each,
# the processes they start too (OMP_NUM_THREADS), so that two workers do not oversubscribe two cores
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
SUITE_CACHE = os.environ.get("CZOO_SUITE_CACHE") or tempfile.mkdtemp(prefix="czoo-test-cache-")
os.environ["CZOO_SUITE_CACHE"] = SUITE_CACHE
os.environ["CONNECTOR_ZOO_CACHE"] = SUITE_CACHE
# --precision auto on a CPU times a training step in fp32 and bf16 and keeps the faster: the suite's runs stay fp32 on
# every machine (their numbers are compared across runs and processes); tests/test_precision_auto.py tests the choice
os.environ["CONNECTOR_ZOO_CPU_BF16"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from connector_zoo.model.vlm import VLMInputs  # noqa: E402
from encoders import build_encoder  # noqa: E402
from llms import build_llm  # noqa: E402

torch.set_num_threads(1 if WORKER else 2)


def pytest_sessionfinish(session, exitstatus):
    """The suite's private cache (worlds, presets, feature caches: about 4 GB) goes with the session, so that repeated
    runs do not fill the disk."""
    import shutil

    if not WORKER:  # the controller, once every worker is done (or a run without workers)
        shutil.rmtree(SUITE_CACHE, ignore_errors=True)


def pytest_report_header(config):
    from bench.run.record import versions

    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())


ENCODER_NAMES = ["clip", "siglip", "eva-vit-g", "dinov2", "fused"]
LLM_NAMES = ["qwen3", "tinyllama", "vicuna"]
# written out, not read from the registry: a connector that vanished from it must fail here, not shrink the grid
BUILTIN_CONNECTORS = [
    "avgpool",
    "c_abstractor",
    "cls_prune",
    "fastv",
    "focus_moe",
    "ldpv2",
    "linear",
    "mlp2x_gelu",
    "perceiver_resampler",
    "pixel_shuffle",
    "prumerge",
    "qformer",
    "random_keep",
    "tokenpacker",
    "visionzip",
]


@pytest.fixture(scope="session")
def encoders():
    return {name: build_encoder(name) for name in ENCODER_NAMES}


@pytest.fixture(scope="session")
def llms():
    return {name: build_llm(name) for name in LLM_NAMES}


def images(n: int, size: int = 64) -> list[Image.Image]:
    """Images that differ: flat colours, a gradient, stripes."""
    import numpy as np

    out = []
    for i in range(n):
        arr = np.zeros((size, size, 3), np.uint8)
        arr[..., i % 3] = 40 + 50 * i
        arr[:, : size // (i + 2)] = 255 - 30 * i
        out.append(Image.fromarray(arr))
    return out


def install_in_hf_cache(src, repo_id: str, cache, monkeypatch) -> None:
    """Put a checkpoint directory into a Hugging Face hub cache under ``repo_id``, laid out as ``hf download`` leaves
    it (models--org--name/refs/main -> snapshots/<commit>/files), and make that the hub cache (HF_HUB_CACHE, read by
    huggingface_hub at import, hence its constant too) with HF_HUB_OFFLINE=1: the checkpoint loads by hub id."""
    import shutil

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(".complete", ".*"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


# ------------------------------------------------------------------ whole CLI runs in a subprocess
ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "run",
    "--world-scale",
    "0.01",
    "--pretrain-steps",
    "3",
    "--connector",
    "mlp2x_gelu",
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--eval-limit",
    "8",
    "--llm",
    "tinyllama",
]


def bench(args: list[str], env: dict[str, str] | None = None, launcher: list[str] | None = None, timeout: float = 900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **(env or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "bench.cli", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def computed(loss_history: list[list[dict]]) -> list[list[dict]]:
    """A run's history without what the clock and the process measured (throughput, memory): what two runs of the
    same settings, or a killed and resumed one, must agree on exactly."""
    from bench.train.trainer import MEASURED

    return [[{k: v for k, v in h.items() if k not in MEASURED} for h in stage] for stage in loss_history]


# ------------------------------------------------------------------ conversations and batches
CONV_A = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "Red."}]
CONV_B = [
    {"role": "user", "content": "Describe the picture in detail, please.\n<image>"},
    {"role": "assistant", "content": "A small blue square above a large green triangle."},
]
# a 3-turn conversation with the image in the first user turn (label tests of every backend)
THREE_TURNS = [
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "How many squares are there?"},
    {"role": "assistant", "content": "Two small squares."},
    {"role": "user", "content": "Is the triangle above the circle?"},
    {"role": "assistant", "content": "Yes."},
]
CONV_TEXT = [{"role": "user", "content": "How many sides has a triangle?"}, {"role": "assistant", "content": "Three."}]


def batch(llm, convs, has_image, pixel_values) -> VLMInputs:
    encoded = [llm.encode_conversation(c) for c in convs]
    return VLMInputs(
        [torch.tensor(e.input_ids) for e in encoded],
        [torch.tensor(e.labels) for e in encoded],
        pixel_values=pixel_values,
        has_image=has_image,
    )


# ------------------------------------------------------------------ bad input (LLaVA records, images)
def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": who, "value": text} for who, text in pairs]


GOOD = turns(("human", "<image>\nWhat colour?"), ("gpt", "red"))
# id -> (record without its id, what the reason must say); every one of these stops nothing
BAD_RECORDS = {
    "two_images": (
        {"image": "a.png", "conversations": turns(("human", "<image>\n<image>\nSame?"), ("gpt", "yes"))},
        "2 <image> tokens",
    ),
    "assistant_first": (
        {"image": "a.png", "conversations": turns(("gpt", "red"), ("human", "<image>\nColour?"))},
        "turn order assistant/user",
    ),
    "two_users": (
        {"conversations": turns(("human", "Hi"), ("human", "Hi?"), ("gpt", "Hello"))},
        "turn order user/user/assistant",
    ),
    "unanswered": (
        {"conversations": turns(("human", "Hi"), ("gpt", "Hello"), ("human", "And?"))},
        "ending on an assistant answer",
    ),
    "empty_answer": ({"conversations": turns(("human", "Hi"), ("gpt", "  "))}, "assistant turn is empty"),
    "image_in_second_turn": (
        {
            "image": "a.png",
            "conversations": turns(("human", "Look."), ("gpt", "ok"), ("human", "<image>\nNow?"), ("gpt", "red")),
        },
        "0 in the first user turn",
    ),
    "text_with_image_token": (
        {"conversations": turns(("human", "<image>\nColour?"), ("gpt", "red"))},
        "1 <image> token(s) in its text but no image",
    ),
    "image_list": ({"image": ["a.png", "b.png"], "conversations": GOOD}, "must be one relative path"),
    "image_number": ({"image": 7, "conversations": GOOD}, "must be one relative path"),
    "no_conversations": ({"image": "a.png"}, "no 'conversations' list"),
    "empty_conversations": ({"conversations": []}, "no 'conversations' list"),
    "unknown_role": (
        {"conversations": turns(("robot", "beep"), ("gpt", "boop"))},
        "turn 0: 'from' is 'robot'; known: human, gpt, user, assistant, system",
    ),
    "value_not_text": (
        {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
        "turn 0: 'value' is int 3, not a string",
    ),
    "from_a_list": (
        {"conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "x"}]},
        "turn 0: 'from' is list ['human'], not a string",
    ),
    "from_an_object": (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": {"r": "gpt"}, "value": "x"}]},
        "turn 1: 'from' is dict {'r': 'gpt'}, not a string",
    ),
    "turn_not_an_object": ({"conversations": ["Hi", {"from": "gpt", "value": "x"}]}, "turn 0 is a str, not an object"),
    "image_path_with_nul": ({"image": "a\x00.png", "conversations": GOOD}, "holds a control character"),
}


def huge_png(path: Path, width: int, height: int) -> None:
    """A real PNG file whose header says width x height (its pixel data is a stub: a decoder would fail late)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
