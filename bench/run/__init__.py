"""A whole run: ``job.py`` (``bench run``: compose, train the stages, evaluate) and ``record.py`` (results.json,
summary, the final model and its transformers copy)."""
