"""The book's machinery, installed with the ``book`` extra: the grid runner (:mod:`.grid`),
the Jupyter Book build (:mod:`.build`), the runs' records and comparisons (:mod:`.results`),
the figures (:mod:`.plots`) and the split explorer's widgets (:mod:`.explore`).

Nothing here is imported by ``import hnd``; each module is imported on its own, so reading
results does not start matplotlib and plotting does not import papermill.
"""
