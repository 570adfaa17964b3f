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
    assert [p.stem for p in NOTEBOOKS] == ["00_data", "01_split_points", "02_train", "03_rate_accuracy",
                                           "04_results", "05_where_to_split"]


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
    assert {"lead_teacher", "stem_ratio", "lead_macs_saved", "bytes_saved_range", "macs_saved_range"} <= glued(nb)


def test_train_refuses_a_rate_weight_for_other_methods(tmp_path):
    """beta is the entropic method's; a non-zero one elsewhere stops the notebook before any
    data is generated or anything is trained."""
    with pytest.raises(pm.PapermillExecutionError) as info:
        execute(NB_DIR / "02_train.ipynb", tmp_path / "out.ipynb", method="hnd", beta=0.5,
                output_dir=str(tmp_path / "run"))
    assert "method hnd has no rate" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_rate_accuracy_demo_measures_an_entropic_student(tmp_path):
    """Without runs the rate notebook measures untrained models; an entropic one is coded with
    its prior's tables and becomes a point with its beta."""
    import json

    nb = execute(NB_DIR / "03_rate_accuracy.ipynb", tmp_path / "out.ipynb", methods=["hnd", "entropic"],
                 qualities=[30, 90], output_dir=str(tmp_path / "rate"))
    assert nb.metadata.papermill.exception is None
    points = json.loads((tmp_path / "rate" / "metrics.json").read_text())["points"]
    coded = [p for p in points if p["method"] == "entropic"]
    assert len(coded) == 1 and coded[0]["setting"] == f"β={coded[0]['beta']:g}" and coded[0]["beta"] > 0
    assert coded[0]["bytes"] >= 8 and coded[0]["label"] == "entropic 3ch"
    assert {p["setting"] for p in points if p["method"] == "hnd"} == {"fp32", "fp16", "int8", "int8+zlib"}
    assert {"entropic_summary", "lead_label", "jpeg_match", "photo_jpeg75", "paper_int8_3ch"} <= glued(nb)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs(nb))
    assert "hnd zlib bytes" in html  # the matched-accuracy table
    # Every point in a scrolling box, and all of them with every column as CSV.
    assert "hnd-scroll-table" in html and html.count("<td>") >= 4 * len(points)
    assert len((tmp_path / "rate" / "rate_accuracy.csv").read_text().splitlines()) == 1 + len(points)
    assert "densenet169 3ch" in html and "2531" in html  # the paper's 3x29x29 bottleneck: 2,523 codes + 8 bytes
    assert str(tmp_path) not in html and "PosixPath" not in html
