"""LLM backends: ``qwen3``, ``tinyllama``, ``vicuna`` and plugins (entry-point group ``connector_zoo.llms``)."""

from __future__ import annotations

from typing import Any

from connector_zoo.registry import Registry

LLMS = Registry("llm", package="llms", entry_point_group="connector_zoo.llms", base_path="llms.base:LLMBackend")
register = LLMS.register


def build_llm(name: str, checkpoint: str | None = None, **kwargs: Any):
    """Build an LLM backend by registered name (or dotted path); ``None`` kwargs keep the defaults."""
    cls, implied = LLMS.resolve(name)
    kwargs = {k: v for k, v in {**implied, **kwargs}.items() if v is not None}
    built = cls.from_checkpoint(checkpoint, **kwargs)
    built.spec = {"name": name, "checkpoint": checkpoint or cls.default_checkpoint, **kwargs}
    return built
