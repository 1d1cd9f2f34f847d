"""Evaluation: ``accuracy.py`` (exact match, blind baseline), ``profile.py``, ``prune_curve.py``, ``peer.py``,
``stats.py`` (paired comparisons), ``lmms.py`` (lmms-eval)."""
