"""The world task's data: the local dataset of the world the evaluated run was trained on."""

from __future__ import annotations

import os

from lmms_eval.api.task import ConfigurableTask

ENV = "CONNECTOR_ZOO_WORLD_TASK_DATA"


class WorldTask(ConfigurableTask):
    def __init__(self, config=None, **kwargs):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        path = os.environ.get(ENV)
        if not path:
            from bench.evaluate.lmms import default_world_task_data

            path = str(default_world_task_data())
        config["dataset_path"] = path
        super().__init__(config=config, **kwargs)
