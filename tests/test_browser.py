"""The headless-Chromium page checker (tests/browser.py), on hand-made pages and on a
tiny Jupyter Book built with the repository's _config.yml and vendored JavaScript.

These tests need Chromium and fail (not skip) without it: the book's offline
rendering is only checked here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from PIL import Image

from browser import INSTALL_HINT, check_pages, find_chromium, inspect_pages

ROOT = Path(__file__).resolve().parents[1]


def need_chromium() -> None:
    """Fail (not skip) the calling test when there is no Chromium."""
    if find_chromium() is None:
        pytest.fail(f"Chromium is needed for the page checks; {INSTALL_HINT}", pytrace=False)


def page(body: str, title: str = "t") -> str:
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>{body}</body></html>"


# Hand-made pages: name -> (HTML body, text one of its problems must contain; None: no problems).
PAGES = {
    "good.html": ('<h1>fine</h1><img src="img/dot.png" alt="dot"><script>let x = 1 + 1;</script>'
                  '<table><tr><td>a table</td></tr></table><pre>| as code |\n|---|</pre>', None),
    "missing_image.html": ('<img src="img/missing.png">', "failed to load file://"),
    "console_error.html": ("<script>console.error('boom', 42)</script>", "console.error: boom 42"),
    "exception.html": ("<script>throw new Error('kaputt')</script>", "uncaught exception: Error: kaputt"),
    "zero_size.html": ('<img src="img/dot.png" width="0">', "image img/dot.png is rendered with zero size"),
    "cdn.html": ('<script src="https://cdn.example.org/x.js"></script>',
                 "request to the network: https://cdn.example.org/x.js"),
    "widget.html": ('<script type="application/vnd.jupyter.widget-view+json">'
                    '{"version_major": 2, "version_minor": 0, "model_id": "abc"}</script>',
                    "widget 1 did not render"),
    "math.html": (r'<p>Area <span class="math notranslate nohighlight">\(a^2\)</span></p>',
                  "math element(s) but MathJax did not load"),
    # A Markdown table displayed by a cell and rendered as CommonMark: one paragraph of pipes.
    "markdown_table.html": ("<p>| claim | holds |\n|---|:---:|\n| smaller | yes |</p>",
                            "a Markdown table shows as text, not as a table: '| claim | holds |"),
    # A table wider than the article, in a page whose <main> is wide enough for it (the theme's
    # <main> holds the article and the page's table of contents).
    "wide_table.html": ('<main style="width: 1000px"><article style="width: 600px"><div style="overflow-x: auto">'
                        '<table style="width: 800px"><tr><td>wide</td></tr></table></div></article></main>',
                        "a table is 800 px wide, wider than the text column (600 px)"),
    # A table that fits the article, in a scrolling box that does not.
    "boxed_table.html": ('<article style="width: 600px"><div style="width: 500px; overflow-x: auto">'
                         '<table style="width: 550px"><tr><td>boxed</td></tr></table></div></article>',
                         "a table scrolls sideways in a box 500 px wide"),
    # The same after Sphinx's smart quotes, which turn --- into em dashes.
    "markdown_table_dashes.html": ("<p>| claim | here |\n| \u2014 | \u2014 |\n| smaller | <strong>holds</strong> |</p>",
                                   "a Markdown table shows as text"),
}


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory) -> dict[str, list[str]] | None:
    """All hand-made pages, checked in one browser run (None without Chromium)."""
    if find_chromium() is None:
        return None
    site = tmp_path_factory.mktemp("site")
    (site / "img").mkdir()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(site / "img" / "dot.png")
    for name, (body, _) in PAGES.items():
        (site / name).write_text(page(body), encoding="utf-8")
    return check_pages(site, list(PAGES) + ["nowhere.html"])


def test_good_page_has_no_problems(hand_made):
    need_chromium()
    assert hand_made["good.html"] == []


@pytest.mark.parametrize("name", [n for n, (_, want) in PAGES.items() if want])
def test_bad_page_reports_its_problem(hand_made, name):
    need_chromium()
    want = PAGES[name][1]
    assert any(want in p for p in hand_made[name]), hand_made[name]


def test_missing_image_names_the_file(hand_made):
    need_chromium()
    text = "\n".join(hand_made["missing_image.html"])
    assert "img/missing.png" in text and "did not load" in text


def test_missing_page_is_a_problem(hand_made):
    need_chromium()
    assert hand_made["nowhere.html"] and "does not exist" in hand_made["nowhere.html"][0]


def test_ignore_drops_matching_problems(tmp_path):
    need_chromium()
    (tmp_path / "p.html").write_text(page("<script>console.error('expected noise')</script>"))
    assert check_pages(tmp_path, ["p.html"], ignore=[(r"expected noise", "test")]) == {"p.html": []}


def chromium_children() -> list[str]:
    """Chromium processes whose parent is this test process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, fields = text.split("(", 1)[1].rsplit(")", 1)[0], text.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and "chrom" in comm:
            found.append(stat.parent.name)
    return found


def test_browser_is_gone_afterwards(hand_made):
    need_chromium()
    assert chromium_children() == []


def test_unstartable_browser_raises(tmp_path, monkeypatch):
    (tmp_path / "p.html").write_text(page("x"))
    monkeypatch.setenv("HND_CHROMIUM", str(tmp_path / "no-such-chromium"))
    with pytest.raises(RuntimeError, match="apt-get install -y chromium"):
        check_pages(tmp_path, ["p.html"])
    monkeypatch.setenv("HND_CHROMIUM", shutil.which("false") or "/bin/false")
    with pytest.raises(RuntimeError, match="did not answer on the DevTools pipe"):
        check_pages(tmp_path, ["p.html"], timeout=10)


# ---------------------------------------------------------------- a real tiny book

WIDGET_CELL = """\
import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display

slider = widgets.IntSlider(value=3, min=0, max=10, description="split")
out = widgets.Output()
fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0, 1, 2], [0, 1, 4])
plt.close(fig)
with out:
    display(fig)
widgets.VBox([slider, out])
"""


# A table a cell displays as Markdown, as the chapters show the papers' claims.
MARKDOWN_TABLE_CELL = """\
from IPython.display import Markdown, display

display(Markdown("| method | top-1 |\\n|---|---:|\\n| HND | 41.7 |"))
"""


def jupyter_book_command() -> list[str]:
    """jupyter-book next to the running interpreter, else its click entry point."""
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]


@pytest.fixture(scope="module")
def tiny_book(tmp_path_factory) -> Path | None:
    """A two-page book (math page + papermill-executed notebook with a widget and a Markdown
    table), built with -W;
    None without Chromium, as nothing could look at it."""
    if find_chromium() is None:
        return None
    base = tmp_path_factory.mktemp("tinybook")
    book = base / "book"
    (book / "book").mkdir(parents=True)
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    shutil.copytree(ROOT / "_vendor", book / "_vendor")
    (book / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: _executed/notebooks/widgets\n")
    (book / "book" / "intro.md").write_text(
        "# Intro\n\nPythagoras:\n\n$$ a^2 + b^2 $$\n\nand inline $c^2$.\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# Widgets\n\nA slider and a figure."),
                nbformat.v4.new_code_cell(WIDGET_CELL), nbformat.v4.new_code_cell(MARKDOWN_TABLE_CELL)]
    source = base / "widgets.ipynb"
    nbformat.write(nb, source)
    executed = book / "_executed" / "notebooks" / "widgets.ipynb"
    executed.parent.mkdir(parents=True)
    pm.execute_notebook(str(source), str(executed), kernel_name="python3", cwd=str(base),
                        progress_bar=False, execution_timeout=120)
    build = subprocess.run([*jupyter_book_command(), "build", str(book), "-W", "-n", "--keep-going"],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return book / "_build" / "html"


TINY_PAGES = ["book/intro.html", "_executed/notebooks/widgets.html"]


@pytest.fixture(scope="module")
def tiny_results(tiny_book) -> dict | None:
    if find_chromium() is None:
        return None
    start = time.monotonic()
    results = inspect_pages(tiny_book, TINY_PAGES)
    per_page = ", ".join(f"{p}: {s.get('seconds', 0):.2f} s" for p, (_, s) in results.items())
    print(f"\nchecked {len(TINY_PAGES)} pages in {time.monotonic() - start:.2f} s ({per_page})")
    return results


def test_tiny_book_pages_have_no_problems(tiny_book, tiny_results):
    need_chromium()
    assert check_pages(tiny_book, TINY_PAGES) == {p: [] for p in TINY_PAGES}
    assert {p: problems for p, (problems, _) in tiny_results.items()} == {p: [] for p in TINY_PAGES}


def test_tiny_book_math_is_typeset(tiny_results):
    need_chromium()
    _, state = tiny_results["book/intro.html"]
    assert state["math"] >= 2 and state["untypeset"] == 0


def test_tiny_book_widgets_rendered_offline(tiny_results):
    need_chromium()
    _, state = tiny_results["_executed/notebooks/widgets.html"]
    assert len(state["widgets"]) == 1
    widget = state["widgets"][0]
    assert widget["rendered"] and widget["areas"] == 1
    assert {"widget-vbox", "widget-slider", "widget-output"} <= set(widget["kinds"])
    figures = [img for img in state["images"] if img["inWidget"]]
    assert figures and figures[0]["natural"] > 0 and figures[0]["src"].startswith("data:image/png")
    assert all(url.startswith(("file:", "data:")) for url in state["requests"])
    assert any(url.split("?")[0].endswith("/_static/html-manager/embed-amd.js") for url in state["requests"])


def test_tiny_book_renders_a_displayed_markdown_table_as_a_table(tiny_book, tiny_results):
    """_config.yml has cells' Markdown parsed as MyST: a table, not a paragraph of pipes."""
    need_chromium()
    text = (tiny_book / "_executed" / "notebooks" / "widgets.html").read_text()
    assert re.search(r"<table[^>]*>.*<p>HND</p>.*<p>41.7</p>.*</table>", text, re.S), text[-3000:]
    _, state = tiny_results["_executed/notebooks/widgets.html"]
    assert state["rawTables"] == []
