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

import datetime
import fnmatch
import itertools
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

import hnd
from hnd.book.results import GRID_FILE, METRICS_FILE, RESULTS_FILE, write_json
from hnd.files import read_json, read_json_if_any, read_mapping, write_text
from hnd.errors import HndError

NOTEBOOKS_DIR = "notebooks"
PROFILES_DIR = "notebooks/profiles"
JOB_FILE = "job.json"  # a cell's cluster job (hnd.book.cluster); a new run of the cell supersedes it
# Parameters the runner sets when a notebook declares them and the profile leaves them out.
# ``processes``: training processes of a cell given several GPUs by a cluster executor.
RUNNER_PARAMETERS = ("output_dir", "profile", "data", "processes")
_PROFILE_KEYS = {"description", "full_scale", "data", "jobs", "slurm", "steps"}
_STEP_KEYS = {"notebook", "name", "grid", "parameters", "wait", "slurm"}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,),
          "dict": (dict,)}


@dataclass
class Profile:
    name: str
    path: Path
    description: str
    full_scale: bool  # GPU-scale: never started without --full
    data: dict  # {"synth": {...}} (generated into <runs>/data), {"imagenet": true} (--data) or {}
    steps: list[dict]
    jobs: int = 1  # cells run at once when `--jobs` is not given
    slurm: dict = field(default_factory=dict)  # job options of every cell (hnd.book.cluster.JOB_OPTIONS)


@dataclass
class Cell:
    id: str  # "<notebook stem>/<cell name>", also its folder under the runs folder
    notebook: str  # stem, e.g. "02_train"
    step: int
    label: str  # for people: "method=hnd, channels=3"
    parameters: dict = field(default_factory=dict)
    phase: int = 0  # cells of one phase run together; a phase starts when the one before has finished
    slurm: dict = field(default_factory=dict)  # the step's job options over the profile's


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
    from hnd.book.cluster import check_job_options

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


def _path(path: Path, cwd: Path | None) -> str:
    """``path`` as a notebook running in ``cwd`` is given it: relative there, so that no
    machine's folder names appear in the executed notebooks (absolute without ``cwd``)."""
    return os.path.relpath(path, cwd) if cwd is not None else str(path)


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
            places = {"out": _path(runs, cwd), "data": _path(data, cwd) if data else "",
                      "cell": _path(runs / cell_id, cwd), "project": _path(project.resolve(), cwd)}
            where = f"profile {profile.name}, cell {cell_id}"
            parameters = _fill({**(step.get("parameters") or {}), **combo}, places, where)
            label = ", ".join(f"{k}={v}" for k, v in combo.items()) or step.get("name") or step["notebook"]
            cells.append(Cell(cell_id, step["notebook"], number, label, parameters, phase,
                              {**profile.slurm, **(step.get("slurm") or {})}))
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


def notebook_path(root: Path, stem: str) -> Path:
    return root / NOTEBOOKS_DIR / f"{stem}.ipynb"


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


def _versions() -> dict:
    out = {"python": platform.python_version(), "hnd": hnd.__version__}
    for package in ("torch", "torchvision", "numpy", "pillow", "papermill", "nbclient", "ipykernel",
                    "jupyter-book", "matplotlib"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def machine_facts() -> dict:
    """CPU model, core count, memory and GPUs of this machine, for run records."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": memory_gib,
            "gpus": gpus}


def _visible_gpus() -> list[str]:
    """CUDA device ids the runner may hand out, one per parallel job."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _git(root: Path) -> dict:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _notebook_error(path: Path) -> str | None:
    """``ename: evalue`` of the first error output of an executed notebook."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001 - a partial or missing notebook has no readable error
        return None
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                value = str(out.get("evalue", "")).strip().splitlines()
                return f"{out.get('ename')}: {value[-1] if value else ''}".rstrip(": ")
    return None


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@dataclass
class CellRun:
    """One cell's papermill run as a picklable value: executed by this process, or shipped to a
    cluster job (:mod:`hnd.book.cluster`) that may run on another machine."""

    cell: str  # the cell's id
    folder: str  # <runs>/<cell id>
    root: str  # the project: papermill starts there
    command: list[str]
    record: dict  # results.json as the run starts

    def __post_init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_process"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _process=None)

    def execute(self, env: dict | None = None, final_on_signal: bool = True) -> dict:
        """Run the notebook (``env`` over this environment); results.json says running, then
        done or failed. Returns the final record. ``final_on_signal=False``: a notebook ended
        by a signal leaves results.json at running (a cluster job's state tells the rest)."""
        folder = Path(self.folder)
        record = {**self.record, "status": "running", "started": _now()}
        write_json(folder / RESULTS_FILE, record)
        start = time.perf_counter()
        with open(folder / "log.txt", "a") as log_file:  # a resumed cell's earlier attempts stay
            log_file.write(f"--- {_now()}: {record.get('job', {}).get('id', 'run')} on {platform.node()}\n")
            log_file.flush()
            self._process = subprocess.Popen(self.command, cwd=self.root, env={**os.environ, **(env or {})},
                                             stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            rc = self._process.wait()
        seconds = round(time.perf_counter() - start, 1)
        if rc < 0 and not final_on_signal:
            return {**record, "seconds": seconds, "error": f"ended by signal {-rc}"}
        metrics_file = folder / METRICS_FILE
        metrics = read_json(metrics_file) if metrics_file.is_file() else {}
        error = None
        if rc != 0:
            error = _notebook_error(folder / "notebook.ipynb") or _log_tail(folder / "log.txt") or f"exit code {rc}"
        record.update(status="done" if rc == 0 else "failed", finished=_now(), seconds=seconds, metrics=metrics,
                      error=error)
        write_json(folder / RESULTS_FILE, record)
        return record

    def stop(self) -> None:
        """End papermill and its kernel (which runs in a session of its own), e.g. before a
        cluster job is requeued: the requeued run resumes from the cell's checkpoints."""
        import psutil

        if self._process is None or self._process.poll() is not None:
            return
        try:
            tree = [psutil.Process(self._process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in tree:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=10)
        for process in alive:
            process.kill()


class _Runner:
    """Prepares and runs cells and keeps ``grid.json`` current (threads share it under a lock)."""

    def __init__(self, profile: Profile, root: Path, runs: Path, cells: list[Cell], data: Path | None,
                 jobs: int, log):
        self.profile, self.root, self.runs, self.cells, self.data = profile, root, runs, cells, data
        self.jobs, self.log = jobs, log
        self.lock = threading.Lock()
        self.slots: queue.Queue[int] = queue.Queue()  # which of the `jobs` parallel places a cell takes
        for slot in range(jobs):
            self.slots.put(slot)
        self.gpus = _visible_gpus()
        self.status: dict[str, dict] = {}
        self.environment = {"versions": _versions(), "git": _git(root), "hardware": machine_facts()}
        for cell in cells:
            saved = self._saved(cell)
            self.status[cell.id] = {k: saved.get(k) for k in ("status", "seconds", "error")} if saved else \
                {"status": "planned", "seconds": None, "error": None}
        self.write_grid()

    def _saved(self, cell: Cell) -> dict | None:
        return read_json_if_any(self.runs / cell.id / RESULTS_FILE)

    def is_done(self, cell: Cell) -> bool:
        saved = self._saved(cell)
        return bool(saved and saved.get("status") == "done" and saved.get("parameters") == cell.parameters
                    and (self.runs / cell.id / "notebook.ipynb").is_file())

    def set_status(self, cell_id: str, status: str, seconds: float | None = None, error: str | None = None) -> None:
        with self.lock:
            self.status[cell_id] = {"status": status, "seconds": seconds, "error": error}
        self.write_grid()

    def write_grid(self) -> None:
        with self.lock:
            cells = [{"id": c.id, "notebook": c.notebook, "label": c.label, "step": c.step, **self.status[c.id]}
                     for c in self.cells]
            write_json(self.runs / GRID_FILE, {"profile": self.profile.name, "description": self.profile.description,
                                               "data": str(self.data) if self.data else None, "updated": _now(),
                                               **self.environment, "cells": cells})

    def prepare(self, cell: Cell, declared: dict, processes: int = 1) -> CellRun:
        """Write the cell's parameters and a queued results.json; the run to execute."""
        folder = self.runs / cell.id
        folder.mkdir(parents=True, exist_ok=True)
        parameters = dict(cell.parameters)
        notebook = notebook_path(self.root, cell.notebook)
        cwd = notebook.parent  # papermill runs the notebook there (--cwd)
        defaults = {"output_dir": _path(folder, cwd), "profile": self.profile.name,
                    "data": _path(self.data, cwd) if self.data else None,
                    "processes": processes if processes > 1 else None}
        for name in RUNNER_PARAMETERS:
            if name in declared and name not in parameters and defaults[name] is not None:
                parameters[name] = defaults[name]
        (folder / METRICS_FILE).unlink(missing_ok=True)
        (folder / JOB_FILE).unlink(missing_ok=True)
        write_json(folder / "parameters.json", parameters)
        write_text(folder / "parameters.yaml", yaml.safe_dump(parameters, sort_keys=False))
        command = [sys.executable, "-m", "papermill", str(notebook), str(folder / "notebook.ipynb"),
                   "-f", str(folder / "parameters.yaml"), "-k", "python3", "--cwd", str(cwd),
                   "--no-progress-bar"]
        record = {"profile": self.profile.name, "cell": cell.id, "notebook": cell.notebook, "label": cell.label,
                  "step": cell.step, "parameters": cell.parameters, "injected": parameters, "status": "queued",
                  "command": " ".join(command[1:]).replace(str(self.root) + os.sep, ""), **self.environment}
        write_json(folder / RESULTS_FILE, record)
        return CellRun(cell.id, str(folder), str(self.root), command, record)

    def run(self, cell: Cell, declared: dict, position: str, parallel: int = 1) -> dict:
        """Run one cell here; ``parallel`` cells of its step run at once (they share the cores)."""
        cell_run = self.prepare(cell, declared)
        self.set_status(cell.id, "running")
        self.log(f"{position} {cell.id}: running")
        slot = self.slots.get()
        env = {}
        if parallel > 1:  # share the cores between parallel kernels, one GPU each if there are enough
            threads = str(max(1, (os.cpu_count() or 1) // parallel))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            if len(self.gpus) >= parallel:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        try:
            record = cell_run.execute(env)
        finally:
            self.slots.put(slot)
        self.set_status(cell.id, record["status"], record["seconds"], record["error"])
        self.log(f"{position} {cell.id}: {record['status']} in {record['seconds']:.1f} s"
                 + (f" ({record['error']})" if record["error"] else ""))
        return record


def _prepare_data(profile: Profile, runs: Path, data: str | os.PathLike | None, log) -> Path | None:
    """The dataset root of the run: given, generated (synth) or required (imagenet)."""
    from hnd.data import check_layout

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
    job_runner_class = None
    if executor is not None:
        from hnd.book.cluster import JobOptions, JobRunner, check_executor

        check_executor(executor)
        JobOptions.from_layers(profile.slurm, job_options or {}, where="job options")  # checked before anything runs
        job_runner_class = JobRunner
    runs = Path(runs).resolve() if runs else default_runs(root, profile.name)
    placeholder = (Path(data).resolve() if data else (runs / "data" if "synth" in profile.data else None))
    cells = plan_cells(profile, runs, placeholder, cwd=root / NOTEBOOKS_DIR)
    chosen = select_cells(cells, only)
    declared = check_cells(cells, root)  # every cell, so a typo anywhere stops the run before it starts
    data_root = _prepare_data(profile, runs, data, log)
    runner = _Runner(profile, root, runs, cells, data_root, cap or 1, log)
    job_runner = job_runner_class(runner, executor, job_options or {}, cap, poll) if job_runner_class else None
    total = len(chosen)
    summaries: dict[str, dict] = {}
    counter = itertools.count(1)
    for phase in sorted({c.phase for c in chosen}):
        todo = []
        for cell in (c for c in chosen if c.phase == phase):
            if runner.is_done(cell):
                log(f"[{next(counter)}/{total}] {cell.id}: done before, skipped")
                summaries[cell.id] = _summary(cell.id, runner._saved(cell), skipped=True)
            else:
                todo.append(cell)
        positions = {cell.id: f"[{next(counter)}/{total}]" for cell in todo}
        if job_runner is not None:
            for cell_id, record in job_runner.run_phase(todo, declared, positions).items():
                summaries[cell_id] = _summary(cell_id, record, skipped=False)
            continue
        parallel = min(jobs, len(todo))  # a phase of one cell keeps every core
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {cell.id: pool.submit(runner.run, cell, declared[cell.notebook], positions[cell.id], parallel)
                       for cell in todo}
            for cell_id, future in futures.items():
                summaries[cell_id] = _summary(cell_id, future.result(), skipped=False)
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
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    failed = sum(s["status"] != "done" for s in summaries)
    lines.append(f"{len(summaries) - failed} of {len(summaries)} cells finished" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)
