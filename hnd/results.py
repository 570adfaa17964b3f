"""Results of the book's grid runs: what a notebook records, and reading every run back.

The grid runner (:mod:`hnd.book`) gives each grid cell a folder ``<runs>/<notebook>/<cell>/``.
A notebook writes its numbers there with :func:`write_metrics` (``metrics.json``); the
runner adds ``results.json`` (parameters, status, metrics, versions, git revision,
hardware, seconds) and keeps ``grid.json``, the plan and status of every cell, in
``<runs>``. The results notebook reads them with :func:`finished_runs` and
:func:`unfinished_cells`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from hnd.checkpoints import atomic_write
from hnd.errors import HndError

METRICS_FILE = "metrics.json"  # a notebook's own numbers, in its output_dir
RESULTS_FILE = "results.json"  # one grid cell: parameters, status, metrics, environment
GRID_FILE = "grid.json"  # the runs folder: every planned cell and its status


def _plain(value: object) -> object:
    """JSON-safe copy: tuples become lists, non-finite floats None, numpy/torch scalars numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, doc: dict) -> Path:
    """Write ``doc`` as indented JSON, atomically."""
    path = Path(path)
    text = json.dumps(_plain(doc), indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")
    return path


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise HndError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise HndError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise HndError(f"{path} must hold a JSON object")
    return doc


def write_metrics(output_dir: str | os.PathLike, metrics: dict) -> Path:
    """Record a notebook's numbers (``metrics.json`` in ``output_dir``) for the grid runner."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return write_json(Path(output_dir) / METRICS_FILE, metrics)


def grid_cells(runs: str | os.PathLike) -> list[dict]:
    """Every cell the runner planned in ``runs`` (id, label, notebook, status, error, seconds)."""
    path = Path(runs) / GRID_FILE
    if not path.is_file():
        raise HndError(f"no grid runs in {runs} (no {GRID_FILE}); run `hnd book run --profile PROFILE` first")
    return read_json(path)["cells"]


def finished_runs(runs: str | os.PathLike, notebook: str | None = None) -> list[dict]:
    """The finished cells of ``runs`` (optionally of one notebook, e.g. ``02_train``), in grid
    order: each cell's ``results.json`` with its metrics."""
    out = []
    for cell in grid_cells(runs):
        if cell["status"] != "done" or (notebook and cell["notebook"] != notebook):
            continue
        path = Path(runs) / cell["id"] / RESULTS_FILE
        if path.is_file():
            out.append(read_json(path))
    return out


def unfinished_cells(runs: str | os.PathLike, notebook: str | None = None) -> list[dict]:
    """Planned cells of ``runs`` that did not finish (failed, interrupted or never run)."""
    return [c for c in grid_cells(runs) if c["status"] != "done" and (not notebook or c["notebook"] == notebook)]


def teacher_reference(runs: list[dict]) -> dict[str, float]:
    """Backbone -> the teacher's test top-1 among training-run metrics: its own ``teacher``
    run if the grid trained it, else the median of what its students' runs measured."""
    from statistics import median

    out = {}
    for backbone in sorted({r["teacher"] for r in runs}):
        own = [r["test_top1"] for r in runs if r["teacher"] == backbone and r["method"] == "teacher"]
        seen = [r["teacher_top1"] for r in runs if r["teacher"] == backbone and r["method"] != "teacher"
                and r.get("teacher_top1") is not None]
        if own or seen:
            out[backbone] = own[0] if own else median(seen)
    return out
