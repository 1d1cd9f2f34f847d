"""The transformers configuration of a composed model: ``model_type = "connector_zoo"``, the three component specs
(name, checkpoint, settings) and the context budget."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

PARTS = ("encoder", "connector", "llm")


class ConnectorZooConfig(PretrainedConfig):
    model_type = "connector_zoo"

    def __init__(
        self,
        encoder: dict | None = None,
        connector: dict | None = None,
        llm: dict | None = None,
        context_budget: int | None = None,
        tiling: dict | None = None,
        **kwargs: Any,
    ):
        # ``context_budget``: the composed model's max_length (transformers reserves that name for generation)
        self.encoder, self.connector, self.llm, self.context_budget = encoder, connector, llm, context_budget
        self.tiling = tiling  # AnyRes: {"name": "anyres", "grid_pinpoints": [[h, w], ...]}, or None
        super().__init__(**kwargs)

    @classmethod
    def from_specs(cls, specs: dict[str, Any]) -> ConnectorZooConfig:
        return cls(specs["encoder"], specs["connector"], specs["llm"], specs.get("max_length"), specs.get("tiling"))

    def specs(self) -> dict[str, Any]:
        specs = {
            "encoder": self.encoder,
            "connector": self.connector,
            "llm": self.llm,
            "max_length": self.context_budget,
        }
        if self.tiling:
            specs["tiling"] = self.tiling
        return specs
