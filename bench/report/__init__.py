"""Reports: ``sweep.py`` (a grid of runs), ``tables.py`` (Markdown/CSV/LaTeX tables), ``plots.py``."""
