"""Tables as the book shows them: every row in a box that scrolls, and a CSV file to download.

pandas cuts a long table to its first and last rows ("…") when a notebook displays it;
:func:`scroll_table` shows every row instead. :func:`csv_download` writes a table into a grid
cell's folder and links it from the page: ``hnd book build`` copies a cell's CSV files into a
folder named like the cell, beside its page (:func:`hnd.book.build.stage_cell_files`).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd
from IPython.display import HTML, Markdown

SCROLL_CLASS = "hnd-scroll-table"  # styled in _vendor/book.css


def _blank_labels(index: pd.Index) -> pd.Index:
    """``index`` with its missing labels as empty strings: ``to_html``'s ``na_rep`` covers only
    the values (a teacher's bottleneck channels are missing in the index of every run)."""
    if isinstance(index, pd.MultiIndex):
        levels = [_blank_labels(index.get_level_values(k)) for k in range(index.nlevels)]
        return pd.MultiIndex.from_arrays(levels, names=index.names)
    return pd.Index(["" if pd.isna(v) else v for v in index], name=index.name) if index.hasnans else index


def scroll_table(frame: pd.DataFrame, label: str = "table") -> HTML:
    """Every row of ``frame`` as an HTML table in a box of limited height that scrolls, its
    header kept in view; ``label`` names the box for screen readers. A missing value (a column
    that does not apply to the row, such as an HND student's β) is an empty cell, not "NaN"."""
    table = frame.set_axis(_blank_labels(frame.index)).to_html(max_rows=None, max_cols=None, na_rep="")
    return HTML(f'<div class="{SCROLL_CLASS}" tabindex="0" role="region" '
                f'aria-label="{html.escape(label)}">{table}</div>')


def csv_download(frame: pd.DataFrame, folder: str | os.PathLike, name: str,
                 text: str = "Download the table as CSV") -> Markdown:
    """Write ``frame`` (without its index; whole numbers as integers) to ``folder/name`` and
    return a MyST download link to it as the book places it: in a folder named like ``folder``
    (the cell's), beside the page."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    frame.convert_dtypes().to_csv(Path(folder) / name, index=False)
    return Markdown(f"[{text}](path:{Path(folder).name}/{name})")
