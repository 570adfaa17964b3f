"""Tables as the book shows them: every row in a scrolling box, a CSV file to download, and the
build placing that file beside the page that links it."""

from __future__ import annotations

import pandas as pd

from hnd.book.build import stage_cell_files
from hnd.book.tables import SCROLL_CLASS, csv_download, scroll_table


def long_frame(rows: int = 74) -> pd.DataFrame:
    return pd.DataFrame({"kind": ["input"] * rows, "setting": [f"q{k}" for k in range(rows)],
                         "bytes": [100.0 + k for k in range(rows)]}).set_index(["kind", "setting"])


def test_scroll_table_shows_every_row_where_pandas_cuts_them():
    frame = long_frame()
    assert "…" in frame._repr_html_() or "..." in frame._repr_html_()  # pandas' own display: cut
    html = scroll_table(frame, "every <point>").data
    assert html.startswith(f'<div class="{SCROLL_CLASS}" tabindex="0" role="region"')
    assert 'aria-label="every &lt;point&gt;"' in html
    assert html.count("<tr") == 2 + 74 and "q0<" in html and "q73<" in html  # two header rows
    assert "…" not in html and "..." not in html


def test_scroll_table_leaves_a_value_that_does_not_apply_empty():
    frame = pd.DataFrame({"method": ["teacher", "hnd", "entropic"], "channels": pd.array([pd.NA, 3, 3], dtype="Int64"),
                          "beta": [None, None, 1.0], "bytes per image": [None, None, 187.1]})
    html = scroll_table(frame.set_index(["method", "channels"])).data  # the teacher has no channels
    assert "NaN" not in html and "<NA>" not in html and "&lt;NA&gt;" not in html
    assert html.count("<td></td>") == 4 and "<td>187.1</td>" in html and ">3</th>" in html


def test_csv_download_writes_the_table_and_links_it_beside_the_page(tmp_path):
    cell = tmp_path / "03_rate_accuracy" / "default"
    cell.mkdir(parents=True)
    frame = long_frame(5).reset_index().assign(channels=[3, 3, None, 12, 12])
    link = csv_download(frame, str(cell), "rate.csv", "All points")
    assert link.data == "[All points](path:default/rate.csv)"
    pd.testing.assert_frame_equal(pd.read_csv(cell / "rate.csv"), frame, check_dtype=False)
    assert (cell / "rate.csv").read_text().splitlines()[:4] == [
        "kind,setting,bytes,channels", "input,q0,100,3", "input,q1,101,3", "input,q2,102,"]


def test_the_build_stages_a_cells_csv_files_beside_its_page(tmp_path):
    cell, stage = tmp_path / "runs" / "03_rate_accuracy" / "default", tmp_path / "_executed" / "03_rate_accuracy"
    cell.mkdir(parents=True)
    stage.mkdir(parents=True)
    (cell / "rate.csv").write_text("a,b\n1,2\n")
    (cell / "metrics.json").write_text("{}")
    stage_cell_files(cell, stage / "default.ipynb")
    assert [p.name for p in (stage / "default").iterdir()] == ["rate.csv"]
    assert (stage / "default" / "rate.csv").read_text() == "a,b\n1,2\n"
    stage_cell_files(tmp_path / "runs", stage / "other.ipynb")  # no CSV: no folder
    assert not (stage / "other").exists()
