"""The book's notebooks: documented parameters, clean sources, papermill runs with other
parameters. (The whole book, built from the smoke profile, is tested in test_book.py.)"""

from __future__ import annotations

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


def test_there_are_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_split_points", "02_train", "03_rate_accuracy", "04_results",
                                             "05_where_to_split"]


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

