"""Project plumbing: dependencies agree, the README's commands are what CI runs, imports stay light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {r for r in project["dependencies"] + [r for extra in extras.values() for r in extra]
                if _name(r) != "hnd"}  # hnd[torch]: one extra taking another
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [r for r in pip if not r.startswith("-e")]
    assert sorted(listed) == sorted(declared) and len(listed) == len(set(listed))
    assert "-e ." in pip


def test_the_edge_extra_is_all_a_device_installs():
    """`pip install "hnd[edge]"`: numpy, Pillow, the range coder and ONNX Runtime; torch is in
    the `torch` extra, which the book's and the server's extras take."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    device = {_name(r) for r in project["dependencies"] + extras["edge"]}
    assert device == {"numpy", "pillow", "constriction", "onnxruntime"}
    assert {"torch", "torchvision"} <= {_name(r) for r in extras["torch"]}
    assert all("hnd[torch]" in extras[name] for name in ("book", "deploy"))


def test_constraints_pin_torch_and_torchvision_together():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])} - {"hnd"}
    assert names <= {_name(p) for p in pins}, "every dependency has a tested version"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(\./run\.sh \w+)\s*$", readme, flags=re.M)
    assert commands[:2] == ["./run.sh book", "./run.sh test"]
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "./run.sh test"


def test_import_hnd_stays_light():
    code = ("import sys, hnd; heavy = {'papermill', 'jupyter_book', 'matplotlib', 'sphinx', 'seaborn'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_results_chapter_reads_runs_without_torch():
    """What the results chapter imports (runs, claims, tables, plots) needs no torch: its kernel
    only reads records, and torch with torchvision is seconds of start-up per kernel."""
    code = ("import sys; import hnd.book.claims, hnd.book.plots, hnd.book.results, hnd.book.tables; "
            "print(sorted({'torch', 'torchvision'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_torchvision_runs_its_compiled_operators():
    """torchvision built for another torch imports, but its C++ operators fail ("operator
    torchvision::nms does not exist"): the pinned pair must run one."""
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert kept.tolist() == [0, 2]


def test_the_live_explorer_files_ship_with_the_package():
    """hnd explore works from an installed package: its notebook and Voila template are package data."""
    from hnd.book.apps import EXPLORER_NOTEBOOK, TEMPLATE, TEMPLATES

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hnd.book"]
    shipped = {p for pattern in patterns for p in (ROOT / "hnd" / "book").glob(pattern)}
    needed = [EXPLORER_NOTEBOOK, *(TEMPLATES / "voila" / "templates" / TEMPLATE).iterdir()]
    assert len(needed) == 3 and all(p in shipped for p in needed), (needed, shipped)
