"""The composed model: any encoder x connector x LLM as one model, and the formats it is used in.

- ``vlm.py``: :class:`VLM` (encode -> connect -> splice the visual tokens where ``<image>`` stands -> LLM; generate;
  save/load), with ``inputs.py`` (``VLMInputs``, ``VLMOutput``) and ``precision.py`` (compute precision, autocast);
- ``configuration.py``, ``modeling.py``, ``processing.py``: the transformers config, model and processor
  (``AutoModelForImageTextToText`` / ``AutoProcessor``); ``llava.py``: the export to ``LlavaForConditionalGeneration``;
- ``lmms.py``: the lmms-eval model (imported only by lmms-eval, which it needs).

It imports the component packages (``encoders``, ``connectors``, ``llms``) and ``connector_zoo``'s plumbing, never
``bench`` (the harness sits on top of it; a contract in pyproject.toml, checked by the suite). Importing this package
registers the Auto classes, whatever was imported before it::

    import connector_zoo.model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained("runs/<dir>/hf")
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from connector_zoo.model.configuration import ConnectorZooConfig
from connector_zoo.model.inputs import SampleTooLong, VLMInputs, VLMOutput
from connector_zoo.model.modeling import ConnectorZooForConditionalGeneration, write_run_model
from connector_zoo.model.processing import ConnectorZooImageProcessor, ConnectorZooProcessor
from connector_zoo.model.vlm import VLM

AutoConfig.register("connector_zoo", ConnectorZooConfig, exist_ok=True)
AutoModelForImageTextToText.register(ConnectorZooConfig, ConnectorZooForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(ConnectorZooConfig, slow_image_processor_class=ConnectorZooImageProcessor, exist_ok=True)
AutoProcessor.register(ConnectorZooConfig, ConnectorZooProcessor, exist_ok=True)

__all__ = [
    "VLM",
    "ConnectorZooConfig",
    "ConnectorZooForConditionalGeneration",
    "ConnectorZooImageProcessor",
    "ConnectorZooProcessor",
    "SampleTooLong",
    "VLMInputs",
    "VLMOutput",
    "write_run_model",
]
