"""The book's notebooks: documented parameters, papermill runs, and an offline ``-W`` build."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
SPLIT_POINTS = NB_DIR / "01_split_points.ipynb"


def execute(notebook: Path, out: Path, **parameters) -> nbformat.NotebookNode:
    """Run ``notebook`` the way ./run.sh book does (kernel python3, cwd notebooks/)."""
    return pm.execute_notebook(str(notebook), str(out), parameters=parameters,
                               kernel_name="python3", cwd=str(NB_DIR), progress_bar=False,
                               execution_timeout=300)


def outputs(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def glued(nb: nbformat.NotebookNode) -> set[str]:
    return {o.metadata["scrapbook"]["name"] for o in outputs(nb)
            if "scrapbook" in o.get("metadata", {})}


def jupyter_book() -> list[str]:
    """The jupyter-book command of the interpreter running the tests."""
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.exists():
        return [str(exe)]
    # jupyter_book 1.x has no __main__ module; call its click entry point instead.
    return [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]


def test_there_are_notebooks():
    assert SPLIT_POINTS in NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_are_documented(notebook):
    params = pm.inspect_notebook(str(notebook))
    assert params, f"{notebook.name} needs a cell tagged 'parameters' with typed parameters"
    for name, p in params.items():
        assert p["help"].strip(), f"{name}: add a trailing '# comment' to document it"
        assert p["inferred_type_name"] not in ("", "None"), f"{name}: annotate its type"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_clean(notebook):
    nb = nbformat.read(notebook, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.metadata.language_info.name == "python"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip outputs"
            too_long = [line for line in cell.source.splitlines() if len(line) > 79]
            assert not too_long, too_long


def test_split_points_runs_with_other_parameters(tmp_path):
    nb = execute(SPLIT_POINTS, tmp_path / "out.ipynb",
                 teachers=["densenet169", "inception_v3"], channels=[3, 12])
    assert nb.metadata.papermill.exception is None
    assert nb.metadata.papermill.parameters == {"teachers": ["densenet169", "inception_v3"],
                                                 "channels": [3, 12]}
    errors = [o for o in outputs(nb) if o.output_type == "error"]
    assert not errors, errors
    figures = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(figures) >= 2 + 2  # one per teacher, then the comparison figures
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs(nb))
    assert "3x29x29" in html and "12x37x37" in html
    assert "resnet152" not in html and "6x29x29" not in html
    assert {"lead_teacher", "stem_ratio", "lead_macs_saved"} <= glued(nb)


def test_book_builds_offline_without_warnings(tmp_path):
    book = tmp_path / "book_root"
    book.mkdir()
    for item in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / item, book / item)
    shutil.copytree(ROOT / "book", book / "book")
    executed = book / "_executed" / "notebooks"
    executed.mkdir(parents=True)
    for notebook in NOTEBOOKS:  # default parameters, as ./run.sh book runs them
        assert execute(notebook, executed / notebook.name).metadata.papermill.exception is None

    done = subprocess.run([*jupyter_book(), "build", str(book), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    problems = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert done.returncode == 0, "\n".join(problems) or log[-4000:]
    assert "build succeeded" in done.stdout

    html = book / "_build" / "html"
    intro = (html / "book" / "intro.html").read_text()
    assert "Head Network Distillation" in intro
    assert 'href="../_executed/notebooks/01_split_points.html' in intro
    chapter = (html / "_executed" / "notebooks" / "01_split_points.html").read_text()
    assert "Where to split a classifier" in chapter
    images = re.findall(r'<img[^>]+src="([^"]+)"', chapter)
    assert len(images) >= 4, images
    for src in images:
        assert (html / "_executed" / "notebooks" / src).is_file(), src
    assert "{glue" not in chapter  # every glue role was resolved
    assert "densenet169" in chapter and "transition2" in chapter
