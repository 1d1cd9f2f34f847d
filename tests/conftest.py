"""Test setup: offline, a private cache for the tiny presets, and session-wide built components."""

from __future__ import annotations

import os
import tempfile

# before anything imports transformers or builds a preset
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CONNECTOR_ZOO_CACHE", tempfile.mkdtemp(prefix="czoo-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from encoders import build_encoder  # noqa: E402
from llms import build_llm  # noqa: E402

torch.set_num_threads(2)

ENCODER_NAMES = ["clip", "siglip", "eva-vit-g"]
LLM_NAMES = ["qwen3", "tinyllama", "vicuna"]
# written out, not read from the registry: a connector that vanished from it must fail here, not shrink the grid
BUILTIN_CONNECTORS = ["cls_prune", "focus_moe", "linear", "mlp2x_gelu", "qformer"]


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
    from pathlib import Path

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(".complete", ".*"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
