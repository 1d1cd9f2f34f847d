"""Token reducers: a training-free reduction of the patch tokens in front of a per-token projector.

``cls_prune`` (FasterVLM's CLS-attention top-k) and its two baselines, ``random_keep`` (k patches at random) and
``avgpool`` (spatial average pooling), share this shape: they choose or merge patch tokens, then project each with an
inner per-token connector (default ``mlp2x_gelu``). They add no parameters, so ``Reducer.wrap(trained_projector,
...)`` puts one in front of an already-trained linear/MLP projector at evaluation time (the pruning curve's setting).
"""

from __future__ import annotations

from typing import Any

from connector_zoo.settings import check
from connectors import build_connector
from connectors.base import Connector, PerTokenConnector


class Reducer(Connector):
    """Base class of the token reducers. Subclasses implement ``configure(**settings)`` (their own settings, with
    their defaults, checked and stored: the one place they are declared) and ``forward``; every reducer also takes
    ``inner`` and ``inner_settings``, the per-token projector it builds."""

    def __init__(
        self, in_dim: int, out_dim: int, inner: str = "mlp2x_gelu", inner_settings: dict | None = None, **settings: Any
    ):
        super().__init__(in_dim, out_dim)
        check(self.registered_name, "inner", inner, str)
        check(self.registered_name, "inner_settings", inner_settings, dict, optional=True)
        self.configure(**settings)
        self.inner = self.check_inner(build_connector(inner, in_dim, out_dim, **(inner_settings or {})))

    def configure(self, **settings: Any) -> None:
        raise NotImplementedError

    @classmethod
    def wrap(cls, projector: PerTokenConnector, **settings: Any) -> Reducer:
        """This reduction in front of an existing (trained) per-token projector, sharing its weights."""
        reducer = cls.__new__(cls)
        Connector.__init__(reducer, projector.in_dim, projector.out_dim)
        reducer.configure(**settings)
        reducer.inner = cls.check_inner(projector)
        reducer.spec = {
            "name": cls.registered_name,
            **settings,
            "inner": projector.spec.get("name", projector.registered_name),
        }
        return reducer

    @classmethod
    def check_inner(cls, projector: Connector) -> PerTokenConnector:
        if not isinstance(projector, PerTokenConnector):
            raise ValueError(
                f"{cls.registered_name} needs a per-token inner projector (linear, mlpNx_gelu); "
                f"{type(projector).__name__} is not one"
            )
        return projector


def keep_count(keep_ratio: float, keep_tokens: int | None, num_patches: int) -> int:
    """k = ``keep_tokens`` or round(``keep_ratio`` * N), within [1, N]."""
    k = keep_tokens if keep_tokens is not None else round(keep_ratio * num_patches)
    return max(1, min(num_patches, k))


def check_keep(owner: str, keep_ratio: float, keep_tokens: int | None) -> None:
    check(owner, "keep_ratio", keep_ratio, float, lo=0, hi=1, lo_open=True)
    check(owner, "keep_tokens", keep_tokens, int, lo=1, optional=True)
