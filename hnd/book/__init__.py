"""The book's machinery, installed with the ``book`` extra: the grid runner (:mod:`.grid`),
the Jupyter Book build (:mod:`.build`), the runs' records and comparisons (:mod:`.results`),
the papers' claims checked against them (:mod:`.claims`), the figures (:mod:`.plots`), long
tables shown whole and as CSV files (:mod:`.tables`), the split explorer's widgets
(:mod:`.explore`) and the generated images measured against real photographs
(:mod:`.photographs`).

Nothing here is imported by ``import hnd``; each module is imported on its own, so reading
results does not start matplotlib and plotting does not import papermill.
"""

EXECUTORS = ("local", "slurm")  # how `hnd book run` may run cells as jobs (cells.py); the CLI names them
