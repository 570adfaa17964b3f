"""The book's grid runner: profiles, one papermill run per grid cell.

A profile (``notebooks/profiles/<name>.yaml``) names a dataset and a list of steps; a step
runs one notebook over the product of its ``grid`` values, plus fixed ``parameters``.
:func:`run_grid` checks every cell's parameter names and types against the notebook's
``parameters`` cell before any kernel starts, then runs the steps in order (the cells of a
step ``jobs`` at a time; a step with ``wait: false`` does not need the steps before it and
starts with them), each with papermill into ``<runs>/<notebook>/<cell>/``: the executed
notebook, ``parameters.yaml``, ``log.txt`` and ``results.json``. Finished cells are skipped,
so an interrupted grid continues where it stopped; a failing cell is recorded and the others
go on. With an executor (``local`` or ``slurm``) each cell runs as a job instead
(:mod:`hnd.book.cluster`). :mod:`hnd.book.build` renders the finished notebooks.

papermill is imported only here, never by ``import hnd``.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
from pathlib import Path

from hnd.book.cells import (NOTEBOOKS_DIR, Cell, CellRunner, JobOptions, Profile, check_executor, check_job_options,
                            notebook_path, notebook_relative, plain_table)
from hnd.errors import HndError
from hnd.files import read_mapping

PROFILES_DIR = "notebooks/profiles"
_PROFILE_KEYS = {"description", "full_scale", "data", "jobs", "slurm", "steps"}
_STEP_KEYS = {"notebook", "name", "grid", "parameters", "wait", "slurm"}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,),
          "dict": (dict,)}


def profile_names(root: str | os.PathLike = ".") -> list[str]:
    return sorted(p.stem for p in (Path(root) / PROFILES_DIR).glob("*.yaml"))


def load_profile(name: str, root: str | os.PathLike = ".") -> Profile:
    """Read and check ``notebooks/profiles/<name>.yaml``."""
    names = profile_names(root)
    path = Path(root) / PROFILES_DIR / f"{name}.yaml"
    if name not in names:
        where = Path(root).resolve() / PROFILES_DIR
        raise HndError(f"unknown profile {name!r}; valid profiles: {', '.join(names) or f'none in {where}'}")
    doc = read_mapping(path)
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise HndError(f"{path} must be a mapping with a non-empty list of steps")
    unknown = set(doc) - _PROFILE_KEYS
    if unknown:
        raise HndError(f"{path}: unknown keys {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_PROFILE_KEYS))}")
    data = doc.get("data") or {}
    if not isinstance(data, dict) or len(data) > 1 or (data and next(iter(data)) not in ("synth", "imagenet")):
        raise HndError(f"{path}: data must be {{synth: {{...}}}} or {{imagenet: true}}")
    jobs = doc.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise HndError(f"{path}: jobs must be a positive integer, got {jobs!r}")
    for i, step in enumerate(doc["steps"], 1):
        if not isinstance(step, dict) or "notebook" not in step:
            raise HndError(f"{path}: step {i} must be a mapping with a notebook")
        bad = set(step) - _STEP_KEYS
        if bad:
            raise HndError(f"{path}: step {i} has unknown keys {', '.join(sorted(bad))}; "
                           f"valid: {', '.join(sorted(_STEP_KEYS))}")
        grid = step.get("grid") or {}
        if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
            raise HndError(f"{path}: step {i}: grid must map parameter names to non-empty lists")
        if not isinstance(step.get("parameters") or {}, dict):
            raise HndError(f"{path}: step {i}: parameters must be a mapping")
        if not isinstance(step.get("wait", True), bool):
            raise HndError(f"{path}: step {i}: wait must be true or false, got {step['wait']!r}")
    check_job_options(doc.get("slurm") or {}, f"{path}: slurm")
    for i, step in enumerate(doc["steps"], 1):
        check_job_options(step.get("slurm") or {}, f"{path}: step {i}: slurm")
    return Profile(name, path, str(doc.get("description", "")).strip(), bool(doc.get("full_scale", False)), data,
                   doc["steps"], jobs, doc.get("slurm") or {})


def _fill(value: object, places: dict[str, str], where: str) -> object:
    """Substitute ``{out}``, ``{data}``, ``{cell}`` in the strings of a parameter value."""
    if isinstance(value, str):
        try:
            return value.format_map(places)
        except (KeyError, ValueError, IndexError) as exc:
            raise HndError(f"{where}: cannot fill {value!r} ({exc}); placeholders: "
                           f"{', '.join('{' + k + '}' for k in places)}") from None
    if isinstance(value, list):
        return [_fill(v, places, where) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, places, where) for k, v in value.items()}
    return value


def _cell_name(step: dict, combo: dict) -> str:
    parts = [step["name"]] if step.get("name") else []
    parts += [f"{k}-{v}" for k, v in combo.items()]
    return "_".join(parts) or "default"


def plan_cells(profile: Profile, runs: Path, data: Path | None, cwd: Path | None = None) -> list[Cell]:
    """Every cell of the profile, in run order, with placeholders filled in: ``{out}`` (the runs
    folder), ``{data}``, ``{cell}`` and ``{project}`` (the folder holding ``notebooks/``, e.g.
    for files shipped with the project), as paths relative to ``cwd``, the notebooks' working
    folder, when given."""
    project = profile.path.parent.parent.parent  # <project>/notebooks/profiles/<name>.yaml
    cells, seen, phase = [], set(), 0
    for number, step in enumerate(profile.steps, 1):
        if number == 1 or step.get("wait", True):  # else the step starts with the one before
            phase += 1
        grid = step.get("grid") or {}
        for values in itertools.product(*grid.values()):
            combo = dict(zip(grid, values))
            cell_id = f"{step['notebook']}/{_cell_name(step, combo)}"
            if cell_id in seen:
                raise HndError(f"{profile.path}: two cells are called {cell_id}; give one step a name")
            seen.add(cell_id)
            places = {"out": notebook_relative(runs, cwd), "data": notebook_relative(data, cwd) if data else "",
                      "cell": notebook_relative(runs / cell_id, cwd),
                      "project": notebook_relative(project.resolve(), cwd)}
            where = f"profile {profile.name}, cell {cell_id}"
            parameters = _fill({**(step.get("parameters") or {}), **combo}, places, where)
            label = ", ".join(f"{k}={v}" for k, v in combo.items()) or step.get("name") or step["notebook"]
            reads_runs = "{out}" in json.dumps(step.get("parameters") or {})
            cells.append(Cell(cell_id, step["notebook"], number, label, parameters, phase,
                              {**profile.slurm, **(step.get("slurm") or {})}, reads_runs))
    return cells


def select_cells(cells: list[Cell], only: str | None) -> list[Cell]:
    """Cells whose id matches ``only`` (a glob, or a substring when it has no wildcard)."""
    if not only:
        return cells
    pattern = only if any(ch in only for ch in "*?[") else f"*{only}*"
    chosen = [c for c in cells if fnmatch.fnmatchcase(c.id, pattern)]
    if not chosen:
        raise HndError(f"--only {only!r} matches no cell; cells: {', '.join(c.id for c in cells)}")
    return chosen


def declared_parameters(notebook: Path) -> dict[str, dict]:
    """The notebook's ``parameters`` cell as papermill reads it: name -> type name, default, help."""
    import papermill

    if not notebook.is_file():
        raise HndError(f"notebook not found: {notebook}")
    return papermill.inspect_notebook(str(notebook))


def _type_ok(value: object, type_name: str) -> bool:
    names = [t.strip() for t in type_name.replace("Optional[", "").rstrip("]").split("|")]
    if value is None:
        return "None" in names or type_name.startswith("Optional[")
    kinds = tuple(k for n in names for k in _TYPES.get(n, (object,)))
    if isinstance(value, bool) and bool not in kinds and object not in kinds:
        return False
    return isinstance(value, kinds)


def check_cells(cells: list[Cell], root: Path) -> dict[str, dict]:
    """Raise a one-line error for the first unknown parameter name or wrongly typed value;
    return each notebook's declared parameters."""
    declared: dict[str, dict] = {}
    for cell in cells:
        if cell.notebook not in declared:
            declared[cell.notebook] = declared_parameters(notebook_path(root, cell.notebook))
        spec = declared[cell.notebook]
        for name, value in cell.parameters.items():
            if name not in spec:
                raise HndError(f"{cell.id}: {cell.notebook}.ipynb has no parameter {name!r}; "
                               f"its parameters: {', '.join(spec)}")
            type_name = spec[name]["inferred_type_name"]
            if not _type_ok(value, type_name):
                raise HndError(f"{cell.id}: parameter {name} must be {type_name}, got {value!r}")
    return declared


def _prepare_data(profile: Profile, runs: Path, data: str | os.PathLike | None, log) -> Path | None:
    """The dataset root of the run: given, generated (synth) or required (imagenet)."""
    from hnd.image_folders import check_layout

    if data:
        return check_layout(data).root
    if "imagenet" in profile.data:
        raise HndError(f"profile {profile.name} runs on ImageNet; give its folder with --data "
                       "(train/ and val/ with one folder per class; see `hnd data imagenet`)")
    if "synth" in profile.data:
        from hnd.synth import ensure_synthetic_dataset

        settings = profile.data["synth"] or {}
        log(f"data: generated dataset in {runs / 'data'} ({settings})")
        try:
            ensure_synthetic_dataset(runs / "data", **settings)
        except TypeError as exc:
            raise HndError(f"{profile.path}: bad synth settings ({exc})") from None
        return (runs / "data").resolve()
    return None


def default_runs(root: Path, profile: str) -> Path:
    return root / "runs" / "book" / profile


def _summary(cell_id: str, record: dict, skipped: bool) -> dict:
    return {"id": cell_id, "status": record.get("status"), "seconds": record.get("seconds"),
            "error": record.get("error"), "metrics": record.get("metrics") or {}, "skipped": skipped}


def run_grid(profile_name: str, *, root: str | os.PathLike = ".", runs: str | os.PathLike | None = None,
             only: str | None = None, jobs: int | None = None, data: str | os.PathLike | None = None,
             full: bool = False, executor: str | None = None, job_options: dict | None = None,
             poll: float | None = None, log=print) -> list[dict]:
    """Run the cells of a profile (see the module docstring); returns one summary per selected
    cell (id, status, seconds, error, metrics). ``jobs``: cells at once (default: the profile's;
    with the slurm executor, no limit). ``executor``: ``local`` or ``slurm`` runs each cell as
    a job through submitit (:mod:`hnd.book.cluster`, with ``job_options`` over the profile's
    and ``poll`` seconds between looks at the jobs); None runs the cells from this process."""
    root = Path(root).resolve()
    profile = load_profile(profile_name, root)
    if executor == "slurm":
        cap = jobs  # Slurm queues the rest
    else:
        cap = jobs = profile.jobs if jobs is None else jobs
    if cap is not None and cap < 1:
        raise HndError(f"--jobs must be at least 1, got {cap}")
    if profile.full_scale and not full:
        raise HndError(f"profile {profile.name} is full scale ({profile.description.splitlines()[0]}); "
                       "add --full to start it")
    if executor is not None:
        check_executor(executor)
        JobOptions.from_layers(profile.slurm, job_options or {}, where="job options")  # checked before anything runs
    runs = Path(runs).resolve() if runs else default_runs(root, profile.name)
    placeholder = (Path(data).resolve() if data else (runs / "data" if "synth" in profile.data else None))
    cells = plan_cells(profile, runs, placeholder, cwd=root / NOTEBOOKS_DIR)
    chosen = select_cells(cells, only)
    declared = check_cells(cells, root)  # every cell, so a typo anywhere stops the run before it starts
    data_root = _prepare_data(profile, runs, data, log)
    runner = CellRunner(profile, root, runs, cells, data_root, cap or 1, log)
    if executor is not None:
        from hnd.book.cluster import JobRunner

        phases = JobRunner(runner, executor, job_options or {}, cap, poll)
    else:
        phases = runner  # one interface: run_phase(cells, declared, positions) -> records
    total = len(chosen)
    summaries: dict[str, dict] = {}
    counter = itertools.count(1)
    for phase in sorted({c.phase for c in chosen}):
        todo = []
        for cell in (c for c in chosen if c.phase == phase):
            if runner.is_done(cell):
                log(f"[{next(counter)}/{total}] {cell.id}: done before, skipped")
                summaries[cell.id] = _summary(cell.id, runner.saved(cell), skipped=True)
                continue
            changed = runner.changed_inputs(cell) if (runner.saved(cell) or {}).get("status") == "done" else []
            if changed:
                log(f"{cell.id}: {', '.join(changed[:3])}{' and others' if len(changed) > 3 else ''} finished "
                    "again since it ran; running it again")
            todo.append(cell)
        positions = {cell.id: f"[{next(counter)}/{total}]" for cell in todo}
        for cell_id, record in phases.run_phase(todo, declared, positions).items():
            summaries[cell_id] = _summary(cell_id, record, skipped=False)
    return [summaries[c.id] for c in chosen]


def headline(metrics: dict) -> str:
    """The one number worth a summary column."""
    for key in ("test_top1", "top1", "headline"):
        if isinstance(metrics.get(key), (int, float)):
            return f"{key} {metrics[key]:.2f}"
    return ""


def summary_table(summaries: list[dict]) -> str:
    """A plain-text table of cell, status, seconds, headline metric, error."""
    rows = [("cell", "status", "seconds", "result")]
    for s in summaries:
        status = s["status"] + (" (cached)" if s.get("skipped") else "")
        seconds = f"{s['seconds']:.1f}" if isinstance(s.get("seconds"), (int, float)) else "-"
        rows.append((s["id"], status, seconds, s["error"] or headline(s.get("metrics") or {})))
    lines = plain_table(rows, right=(2,))
    failed = sum(s["status"] != "done" for s in summaries)
    lines.append(f"{len(summaries) - failed} of {len(summaries)} cells finished" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)
