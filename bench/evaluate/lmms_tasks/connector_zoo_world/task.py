"""The world task's data: the local dataset of the world the evaluated run was trained on (the run that
``connector_zoo.model.lmms`` names in ``CONNECTOR_ZOO_EVAL_RUN``), or the default world's for any other model."""

from __future__ import annotations

import os

from lmms_eval.api.task import ConfigurableTask

from bench.evaluate.lmms import default_world_task_data, prepare_world_task
from connector_zoo.model.lmms import RUN_ENV


class WorldTask(ConfigurableTask):
    def __init__(self, config=None, **kwargs):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        run = os.environ.get(RUN_ENV)
        path = prepare_world_task(run) if run else None
        if path is None:  # no run named, or a run trained on other data: the default world's questions
            path = default_world_task_data()
        config["dataset_path"] = str(path)
        super().__init__(config=config, **kwargs)
