"""Data: ``formats.py`` (samples, LLaVA JSON, HF messages, the world as samples), ``images.py`` (image tables and
identities), ``store.py`` and ``features.py`` (the feature store and cache), ``world.py`` (the embedded mini world),
``loader.py`` (batches built in worker processes)."""
