"""Connectors: one file each (``linear``, ``mlpNx_gelu``, ``qformer``, ``c_abstractor``, ``ldpv2``, ``pixel_shuffle``,
``tokenpacker``, ``perceiver_resampler``, ``focus_moe``; training-free reducers ``cls_prune``, ``visionzip``,
``prumerge``, ``random_keep``, ``avgpool``) and plugins.

Third parties add one with ``@connectors.register("name")``, an entry point in group ``connector_zoo.connectors``, or
a dotted path ``my_pkg.my_mod:MyConnector``; it must subclass :class:`connectors.base.Connector`.
"""

from __future__ import annotations

from typing import Any

from connector_zoo.registry import Registry

CONNECTORS = Registry(
    "connector",
    package="connectors",
    entry_point_group="connector_zoo.connectors",
    base_path="connectors.base:Connector",
)
register = CONNECTORS.register


def build_connector(name: str, in_dim: int, out_dim: int, **kwargs: Any):
    """Build a connector by name; ``None`` kwargs keep its defaults; the spec is kept for saving and reports."""
    cls, implied = CONNECTORS.resolve(name)
    kwargs = {k: v for k, v in {**implied, **kwargs}.items() if v is not None}
    try:
        connector = cls(in_dim, out_dim, **kwargs)
    except TypeError as err:
        raise TypeError(f"connector {name!r} does not accept these settings {kwargs}: {err}") from err
    connector.spec = {"name": name, **{k: v for k, v in kwargs.items() if k not in implied}}
    return connector
