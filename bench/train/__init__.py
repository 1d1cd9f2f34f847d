"""Training: ``config.py`` (recipes, ``RunConfig``, the data and model a run builds, its feature sources),
``trainer.py`` (one stage), ``pretrain.py`` (the mini world's backbones), ``precision.py``, ``plan.py`` (memory and FLOP
plan)."""
