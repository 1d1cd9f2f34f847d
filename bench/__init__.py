"""The harness, arranged by stage, on top of the composed model (``connector_zoo.model``: the VLM, its transformers
model and processor, the Llava export, the lmms-eval model); each package depends only on the ones above it here:

- ``bench.data``: data formats (LLaVA JSON, HF messages), image tables and their store, the embedded mini world,
  the worker-side loader;
- ``bench.train``: run configuration and recipes, the trainer, the feature cache, the world's backbone pretraining,
  precision and memory policy, the memory/FLOP plan, the run itself and its record;
- ``bench.evaluate``: accuracy and the blind baseline, profiling, the pruning curve, the peer benchmark, paired
  statistics, lmms-eval;
- ``bench.report``: sweeps, tables and plots;
- ``bench.cli``: the ``bench`` command, one thin adapter per command.
"""
