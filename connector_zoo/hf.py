"""Loading transformers checkpoints by preset, local directory or hub id (offline cache), with actionable errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connector_zoo.io import cache_dir, materialize
from connector_zoo.settings import SettingError


def preset_dir(family: str, preset: str, params: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Directory of a tiny preset, built once with ``save_pretrained`` and then loaded like any local checkpoint."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def quiet_build(tmp: Path) -> None:  # transformers' "Writing model shards" bar is not this command's output
        import torch  # (here, not at the top: `bench list` imports this module and must not load torch)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # a preset seeds its own weights; the caller's random state stays as it was, so what is initialised next (a
        # run's connector) does not depend on whether the preset was already in the cache
        with torch.random.fork_rng(devices=[]):
            build(tmp)

    return materialize(cache_dir() / "presets" / f"{family}-{preset}-{digest}", quiet_build)


def load_pretrained(loader: Callable[..., Any], checkpoint: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    """``loader(checkpoint, **kwargs)`` with an error that says what to do when a hub id is not available offline."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown the bench's own output
    try:
        return loader(str(checkpoint), **kwargs)
    except (OSError, ValueError) as err:
        local = Path(checkpoint).exists()
        hint = (
            f"{checkpoint} exists but is not a valid {what} checkpoint directory"
            if local
            else f"{checkpoint!r} is neither a local directory nor in the Hugging Face cache; without internet, "
            f"download it on a connected machine (`hf download {checkpoint}`) and copy the cache, or pass a local path"
        )
        raise OSError(f"could not load {what} from {checkpoint!r}: {hint}. ({type(err).__name__}: {err})") from err


def gguf_source(checkpoint: str) -> tuple[str, dict[str, Any]]:
    """(what to pass to ``from_pretrained``, its extra keyword arguments) for a checkpoint that may name a GGUF file:
    ``path/to/model.gguf`` -> (its folder, ``gguf_file=`` its name); ``hub-id:file.gguf`` -> (the hub id, ``gguf_file=``
    the file of that repository, read from the Hugging Face cache offline); anything else unchanged."""
    text = str(checkpoint)
    if not text.endswith(".gguf"):
        return text, {}
    if importlib.util.find_spec("gguf") is None:
        raise SettingError(
            f"{text!r} is a GGUF file, which transformers reads with the gguf package: "
            "pip install 'connector-zoo[gguf]'"
        )
    local = Path(text).expanduser()
    if local.is_file():
        return str(local.resolve().parent), {"gguf_file": local.name}
    repo, sep, name = text.rpartition(":")
    if sep and repo and "/" not in name and not Path(repo).exists():
        return repo, {"gguf_file": name}
    raise FileNotFoundError(
        f"GGUF checkpoint {text!r}: no such file; pass an existing path/to/model.gguf, or "
        "hub-id:file.gguf for a file of a Hugging Face repository in the local cache"
    )


def plain_model(model):
    """A model read from a GGUF file as the plain model it is: transformers de-quantizes the weights on loading but
    leaves a "gguf" quantizer attached, and ``save_pretrained`` refuses such a model (a world LLM cut from a GGUF, a
    run saved with its backbones embedded). Other models are returned untouched."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


RANDOM_PREFIX = "random:"


def random_geometry(
    checkpoint: str, geometries: dict[str, dict[str, Any]], layers_key: str, default_layers: int
) -> tuple[str, dict[str, Any]] | None:
    """``random:<hub id>[:layers=N]`` -> (preset name, config kwargs): the real checkpoint's geometry (widths, patch
    grid, vocabulary, context) with N layers and random weights, built locally. It runs the real-size path (shapes,
    memory, dtypes) without downloading anything; ``None`` for any other checkpoint string."""
    if not checkpoint.startswith(RANDOM_PREFIX):
        return None
    hub_id, _, option = checkpoint[len(RANDOM_PREFIX) :].partition(":")
    if hub_id not in geometries:
        raise ValueError(f"no known geometry for {hub_id!r} in {checkpoint!r}; known: {', '.join(geometries)}")
    layers = default_layers
    if option:
        key, _, value = option.partition("=")
        if key != "layers" or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{checkpoint!r}: the option after the id must be layers=N with N >= 1, got {option!r}")
        layers = int(value)
    return f"random-{hub_id.replace('/', '--')}-L{layers}", {**geometries[hub_id], layers_key: layers}
