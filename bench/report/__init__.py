"""Reports: ``sweep.py`` (a grid of runs), ``tables.py`` (Markdown/CSV/LaTeX tables), ``plots.py`` (PNG/SVG plots),
``html.py`` (the self-contained HTML page, with ``charts.py``'s figures, ``breakdown.py``'s error breakdown of the
mini world and ``templates/report.html.j2``)."""
