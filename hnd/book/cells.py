"""What the book's grid runs, below both ways of running it: profiles and cells, a cell's
papermill run (:class:`CellRun`), the runner that prepares cells, records their state in
``grid.json`` and runs a phase on a pool of threads (:class:`CellRunner`), and the job options
that a cluster executor (:mod:`hnd.book.cluster`) reads. :mod:`hnd.book.grid` plans and runs a
profile with either; neither imports the other's internals.
"""

from __future__ import annotations

import datetime
import os
import platform
import queue
import re
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
from hnd.book import EXECUTORS
from hnd.book.results import GRID_FILE, METRICS_FILE, RESULTS_FILE, write_json
from hnd.errors import HndError
from hnd.files import read_json, read_json_if_any, write_text
from hnd.machine import machine_facts

NOTEBOOKS_DIR = "notebooks"
JOB_FILE = "job.json"  # a cell's cluster job (hnd.book.cluster); a new run of the cell supersedes it
# Parameters the runner sets when a notebook declares them and the profile leaves them out.
# ``processes``: training processes of a cell given several GPUs by a cluster executor.
RUNNER_PARAMETERS = ("output_dir", "profile", "data", "processes")
_KINDS = {"partition": (str,), "gpus": (int,), "cpus": (int,), "time": (int, str), "account": (str,),
          "mem": (str,), "sbatch": (list,), "setup": (list,), "requeues": (int,)}
JOB_OPTIONS = tuple(_KINDS)


@dataclass
class Profile:
    name: str
    path: Path
    description: str
    full_scale: bool  # GPU-scale: never started without --full
    data: dict  # {"synth": {...}} (generated into <runs>/data), {"imagenet": true} (--data) or {}
    steps: list[dict]
    jobs: int = 1  # cells run at once when `--jobs` is not given
    slurm: dict = field(default_factory=dict)  # job options of every cell (JOB_OPTIONS)


@dataclass
class Cell:
    id: str  # "<notebook stem>/<cell name>", also its folder under the runs folder
    notebook: str  # stem, e.g. "02_train"
    step: int
    label: str  # for people: "method=hnd, channels=3"
    parameters: dict = field(default_factory=dict)
    phase: int = 0  # cells of one phase run together; a phase starts when the one before has finished
    slurm: dict = field(default_factory=dict)  # the step's job options over the profile's
    reads_runs: bool = False  # a parameter names the runs folder ({out}): it reads earlier phases' cells


def notebook_path(root: Path, stem: str) -> Path:
    """The notebook of a cell, by its stem (e.g. ``02_train``)."""
    return root / NOTEBOOKS_DIR / f"{stem}.ipynb"


def notebook_relative(path: Path, cwd: Path | None) -> str:
    """``path`` as a notebook running in ``cwd`` is given it: relative there, so that no
    machine's folder names appear in the executed notebooks (absolute without ``cwd``)."""
    return os.path.relpath(path, cwd) if cwd is not None else str(path)


def _versions() -> dict:
    out = {"python": platform.python_version(), "hnd": hnd.__version__}
    for package in ("torch", "torchvision", "numpy", "pillow", "papermill", "nbclient", "ipykernel",
                    "jupyter-book", "matplotlib"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


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


def now() -> str:
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


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# jupyter_client picks free ports for a kernel, then the kernel binds them: a process that takes
# one in between (another kernel starting beside it) makes the kernel die before any cell ran.
PORT_TAKEN = ("Address already in use", "Kernel died before replying to kernel_info")
KERNEL_STARTS = 3  # tries per run when that happens


def _lost_its_ports(log: Path, begin: int) -> bool:
    """Whether the run logged from byte ``begin`` of ``log`` on ended with a kernel that died
    at start because one of its ports was taken."""
    with open(log, "rb") as f:
        f.seek(begin)
        text = f.read().decode(errors="replace")
    return all(sign in text for sign in PORT_TAKEN)


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
        record = {**self.record, "status": "running", "started": now()}
        write_json(folder / RESULTS_FILE, record)
        start = time.perf_counter()
        with open(folder / "log.txt", "a") as log_file:  # a resumed cell's earlier attempts stay
            log_file.write(f"--- {now()}: {record.get('job', {}).get('id', 'run')} on {platform.node()}\n")
            for attempt in range(1, KERNEL_STARTS + 1):
                log_file.flush()
                begin = os.fstat(log_file.fileno()).st_size  # the kernels write here too
                self._process = subprocess.Popen(self.command, cwd=self.root, env={**os.environ, **(env or {})},
                                                 stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                rc = self._process.wait()
                if rc == 0 or attempt == KERNEL_STARTS or not _lost_its_ports(folder / "log.txt", begin):
                    break
                log_file.write(f"--- {now()}: the kernel could not bind its ports; starting it again\n")
        seconds = round(time.perf_counter() - start, 1)
        if rc < 0 and not final_on_signal:
            return {**record, "seconds": seconds, "error": f"ended by signal {-rc}"}
        metrics_file = folder / METRICS_FILE
        metrics = read_json(metrics_file) if metrics_file.is_file() else {}
        error = None
        if rc != 0:
            error = _notebook_error(folder / "notebook.ipynb") or log_tail(folder / "log.txt") or f"exit code {rc}"
        record.update(status="done" if rc == 0 else "failed", finished=now(), seconds=seconds, metrics=metrics,
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


class CellRunner:
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
            saved = self.saved(cell)
            self.status[cell.id] = {k: saved.get(k) for k in ("status", "seconds", "error")} if saved else \
                {"status": "planned", "seconds": None, "error": None}
        self.write_grid()

    def saved(self, cell: Cell) -> dict | None:
        """The cell's results.json, if any."""
        return read_json_if_any(self.runs / cell.id / RESULTS_FILE)

    def is_done(self, cell: Cell) -> bool:
        """Finished with these parameters, and nothing it reads has finished again since."""
        saved = self.saved(cell)
        return bool(saved and saved.get("status") == "done" and saved.get("parameters") == cell.parameters
                    and (self.runs / cell.id / "notebook.ipynb").is_file() and not self.changed_inputs(cell, saved))

    def inputs(self, cell: Cell) -> dict[str, str | None]:
        """When each cell that ``cell`` reads last finished: the cells of the phases before it,
        if it reads the runs folder (a chapter that gathers the training runs)."""
        if not cell.reads_runs:
            return {}
        return {c.id: (self.saved(c) or {}).get("finished") for c in self.cells if c.phase < cell.phase}

    def changed_inputs(self, cell: Cell, saved: dict | None = None) -> list[str]:
        """The cells ``cell`` reads that finished again after it ran (a resubmitted run)."""
        before = (saved if saved is not None else self.saved(cell) or {}).get("inputs") or {}
        return [k for k, stamp in self.inputs(cell).items() if before.get(k) != stamp]

    def set_status(self, cell_id: str, status: str, seconds: float | None = None, error: str | None = None) -> None:
        with self.lock:
            self.status[cell_id] = {"status": status, "seconds": seconds, "error": error}
        self.write_grid()

    def write_grid(self) -> None:
        with self.lock:
            cells = [{"id": c.id, "notebook": c.notebook, "label": c.label, "step": c.step, **self.status[c.id]}
                     for c in self.cells]
            write_json(self.runs / GRID_FILE, {"profile": self.profile.name, "description": self.profile.description,
                                               "data": str(self.data) if self.data else None, "updated": now(),
                                               **self.environment, "cells": cells})

    def prepare(self, cell: Cell, declared: dict, processes: int = 1) -> CellRun:
        """Write the cell's parameters and a queued results.json; the run to execute."""
        folder = self.runs / cell.id
        folder.mkdir(parents=True, exist_ok=True)
        parameters = dict(cell.parameters)
        notebook = notebook_path(self.root, cell.notebook)
        cwd = notebook.parent  # papermill runs the notebook there (--cwd)
        defaults = {"output_dir": notebook_relative(folder, cwd), "profile": self.profile.name,
                    "data": notebook_relative(self.data, cwd) if self.data else None,
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
                  "inputs": self.inputs(cell),
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

    def run_phase(self, cells: list[Cell], declared: dict[str, dict], positions: dict[str, str]) -> dict[str, dict]:
        """Run ``cells`` here, ``jobs`` at a time (a phase of one cell keeps every core); their
        final records. :class:`hnd.book.cluster.JobRunner` runs a phase as jobs instead."""
        parallel = min(self.jobs, len(cells)) or 1
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {c.id: pool.submit(self.run, c, declared[c.notebook], positions[c.id], parallel) for c in cells}
            return {cell_id: future.result() for cell_id, future in futures.items()}


def parse_time(value: int | str, where: str = "time") -> int:
    """A time limit as Slurm writes it (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)
    in whole minutes, rounded up."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
        if not match:
            raise HndError(f"{where}: {value!r} is not a time limit; valid: minutes, HH:MM:SS or D-HH:MM:SS")
        days, parts = match.group(1), [int(p) for p in match.groups()[1:] if p is not None]
        if days is None and len(parts) < 3:  # MM or MM:SS: no hours
            parts = [0, *parts]
        hours, mins, secs = (parts + [0, 0])[:3]  # D-HH[:MM[:SS]] or HH:MM:SS
        minutes = -(-(int(days or 0) * 86400 + hours * 3600 + mins * 60 + secs) // 60)
    if minutes < 1:
        raise HndError(f"{where}: the time limit must be at least a minute, got {value!r}")
    return minutes


def sbatch_flags(flags: list, where: str = "sbatch") -> dict:
    """``["--qos=high", "--exclusive"]`` as submitit's additional sbatch parameters."""
    out = {}
    for flag in flags:
        match = re.fullmatch(r"-{0,2}([A-Za-z][A-Za-z0-9_-]*)(?:=(.+))?", str(flag).strip())
        if not isinstance(flag, str) or not match:
            raise HndError(f"{where}: {flag!r} is not an sbatch flag; write it as --name=value or --name")
        out[match.group(1).replace("-", "_")] = match.group(2) if match.group(2) is not None else True
    return out


@dataclass(frozen=True)
class JobOptions:
    """What one cell's job asks the cluster for."""

    partition: str | None = None
    gpus: int = 0  # per job; more than one: the cell trains under torchrun, one process per GPU
    cpus: int | None = None  # per job (Slurm's cpus-per-task); also the job's torch threads
    time: int = 1440  # minutes
    account: str | None = None
    mem: str | None = None  # e.g. 64G
    sbatch: dict = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    requeues: int = 3

    @classmethod
    def from_layers(cls, *layers: dict, where: str = "slurm") -> "JobOptions":
        """Options from mappings, later ones over earlier ones (profile, step, command line)."""
        merged = {}
        for layer in layers:
            check_job_options(layer, where)
            merged.update({k: v for k, v in layer.items() if v is not None})
        if "time" in merged:
            merged["time"] = parse_time(merged["time"], f"{where}: time")
        if "sbatch" in merged:
            merged["sbatch"] = sbatch_flags(merged["sbatch"], f"{where}: sbatch")
        if "setup" in merged:
            merged["setup"] = tuple(merged["setup"])
        return cls(**merged)


def check_job_options(doc: dict, where: str) -> None:
    """Raise a one-line error for an unknown job option or a value of the wrong kind."""
    if not isinstance(doc, dict):
        raise HndError(f"{where} must be a mapping of job options ({', '.join(JOB_OPTIONS)})")
    for key, value in doc.items():
        if key not in _KINDS:
            raise HndError(f"{where}: unknown job option {key!r}; valid: {', '.join(JOB_OPTIONS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, _KINDS[key]):
            kinds = " or ".join("a number" if k is int else "text" if k is str else "a list" for k in _KINDS[key])
            raise HndError(f"{where}: {key} must be {kinds}, got {value!r}")
        if key in ("gpus", "requeues") and value < 0 or key == "cpus" and value < 1:
            raise HndError(f"{where}: {key} must be at least {1 if key == 'cpus' else 0}, got {value}")
        if key == "time":
            parse_time(value, f"{where}: time")
        if key == "sbatch":
            sbatch_flags(value, f"{where}: sbatch")
        if key == "setup" and not all(isinstance(line, str) for line in value):
            raise HndError(f"{where}: setup must be a list of shell lines")


def check_executor(kind: str) -> None:
    """A one-line error for an unknown executor, or for Slurm on a machine without it or whose
    controller does not answer. Accounting (``sacct``) is not needed: job states come from
    ``squeue`` where it is off."""
    import shutil
    import subprocess

    if kind not in EXECUTORS:
        raise HndError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")
    if kind != "slurm":
        return
    missing = [tool for tool in ("sbatch", "srun", "squeue") if shutil.which(tool) is None]
    if missing:
        raise HndError(f"--executor slurm needs Slurm's {', '.join(missing)} on PATH; on a machine without Slurm "
                       "run the grid with --executor local (or without --executor)")
    try:
        answer = subprocess.run(["squeue", "-h", "--me", "-o", "%i"], capture_output=True, text=True, timeout=60)
        said = (answer.stderr.strip().splitlines() or [f"exit status {answer.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        answer, said = None, "no answer within 60 s"
    if answer is None or answer.returncode != 0:
        raise HndError(f"--executor slurm: the Slurm controller does not answer (squeue: {said}); check "
                       "`scontrol ping` or run the grid with --executor local")


def plain_table(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    """Rows of text as aligned lines (columns in ``right`` right-aligned, the last one free)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [("  ".join(f"{v:>{w}}" if i in right else f"{v:{w}}" for i, (v, w) in enumerate(zip(r, widths)))
             + "  " + r[-1]).rstrip() for r in rows]
