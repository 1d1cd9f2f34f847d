"""Vision encoders: ``clip``, ``siglip``, ``eva-vit-g``, ``dinov2``, ``fused`` (encoders side by side) and plugins
(entry-point group ``connector_zoo.encoders``)."""

from __future__ import annotations

from typing import Any

from connector_zoo.registry import Registry

ENCODERS = Registry(
    "encoder", package="encoders", entry_point_group="connector_zoo.encoders", base_path="encoders.base:VisionEncoder"
)
register = ENCODERS.register


def build_encoder(name: str, checkpoint: str | None = None, **kwargs: Any):
    """Build an encoder by registered name (or dotted path); ``None`` kwargs keep the component's defaults."""
    cls, implied = ENCODERS.resolve(name)
    kwargs = {k: v for k, v in {**implied, **kwargs}.items() if v is not None}
    built = cls.from_checkpoint(checkpoint, **kwargs)
    built.spec = {"name": name, "checkpoint": checkpoint or cls.default_checkpoint, **kwargs}
    return built
