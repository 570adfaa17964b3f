"""The book's notebooks: documented parameters, papermill execution, an offline -W build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _execute(notebook: Path, out: Path, **parameters) -> nbformat.NotebookNode:
    return pm.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name="python3",
                               cwd=str(notebook.parent), progress_bar=False)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_documented_and_outputs_stripped(notebook):
    params = pm.inspect_notebook(str(notebook))
    assert params, "a cell tagged 'parameters'"
    for name, p in params.items():
        assert p["help"].strip() and p["inferred_type_name"] != "None", name
    nb = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert nb.metadata.kernelspec.name == "python3"


def test_split_points_notebook_runs_with_other_parameters(tmp_path):
    nb = _execute(ROOT / "notebooks/01_split_points.ipynb", tmp_path / "out.ipynb",
                  teachers=["resnet50", "inception_v3"], channels=[2, 12])
    assert nb.metadata.papermill.exception is None
    assert _images(nb) >= 2
    text = "".join(o.get("data", {}).get("text/plain", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "resnet50" in text and "inception_v3" in text and "densenet169" not in text


def test_book_builds_offline_with_no_warnings(tmp_path):
    for item in ("_config.yml", "_toc.yml", "book"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    executed = tmp_path / "_executed" / "notebooks"
    executed.mkdir(parents=True)
    for notebook in NOTEBOOKS:
        assert _execute(notebook, executed / notebook.name).metadata.papermill.exception is None
    jb = Path(sys.executable).with_name("jupyter-book")
    done = subprocess.run([str(jb), "build", str(tmp_path), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    assert "Head Network Distillation" in (html / "book" / "intro.html").read_text()
    chapter = (html / "_executed" / "notebooks" / "01_split_points.html").read_text()
    assert chapter.count("<img") >= 2 and "Where to split a classifier" in chapter
