"""The composed model: ``vlm.py`` (``VLM``: encoder -> connector -> LLM, splice, generate, save/load) and
``export.py`` (the Llava export)."""
