"""The book's grid as cluster jobs: ``hnd book run --executor slurm|local`` through submitit.

Every cell not finished before becomes one job: a Slurm job, or a process of submitit's local
executor, which runs the same path on this machine. The job runs the cell's notebook exactly
as ``hnd book run`` does without an executor (:class:`hnd.book.cells.CellRun`) and writes the
cell's ``results.json`` itself, so the command that submitted the jobs may stop at any time:
run it again and it follows the jobs still queued or running (each cell folder's ``job.json``
names its job), skips finished cells and resubmits failed or killed ones, whose training
continues from the cell's ``last.pt``. A job that Slurm preempts or that reaches its time
limit is checkpointed by submitit and requeued (the notebook runs again and resumes the same
way). A cell given several GPUs trains under torchrun inside its job. :func:`grid_status` is
``hnd book status``.

Job options come from the profile's ``slurm`` mapping, then the step's, then the command
line: ``partition``, ``gpus`` and ``cpus`` per job, ``time`` (minutes or Slurm's
``D-HH:MM:SS``), ``account``, ``mem``, ``sbatch`` (extra flags such as ``--qos=high``),
``setup`` (shell lines run before the job, e.g. ``module load cuda``) and ``requeues`` (time
limits a cell may reach before it fails; preemptions do not count).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from hnd.book.cells import (JOB_FILE, Cell, CellRun, CellRunner, JobOptions, check_executor, log_tail, now,
                            plain_table)
from hnd.book.results import GRID_FILE, RESULTS_FILE, write_json
from hnd.errors import HndError
from hnd.files import read_json_if_any
from hnd.machine import machine_facts

JOBS_DIR = "jobs"  # submitit's pickles and logs, in each cell's folder
# Slurm job states (sacct) of a job that may still run the cell; the first group has not started.
_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
_ALIVE = _WAITING | {"RUNNING", "COMPLETING", "RESIZING", "STAGE_OUT", "SIGNALING", "UNKNOWN", "READY"}


def make_executor(kind: str, folder: Path, options: JobOptions, name: str, visible_gpus: list[int] = ()):
    """A submitit executor for one cell's job (``folder``: its pickles and logs)."""
    import submitit

    check_executor(kind)
    if kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.requeues)
        parameters = {"job_name": name, "time": options.time, "nodes": 1, "ntasks_per_node": 1,
                      "signal_delay_s": 120, "stderr_to_stdout": True, "partition": options.partition,
                      "gpus_per_node": options.gpus or None, "cpus_per_task": options.cpus,
                      "account": options.account, "mem": options.mem, "setup": list(options.setup) or None,
                      "additional_parameters": options.sbatch or None}
    else:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.requeues)
        parameters = {"timeout_min": options.time, "gpus_per_node": options.gpus, "stderr_to_stdout": True,
                      "signal_delay_s": min(120, options.time * 30), "setup": list(options.setup) or None,
                      "visible_gpus": list(visible_gpus) or None}
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return executor


@contextmanager
def _jobs_ignore_ctrl_c(kind: str):
    """Local jobs are this command's children: started with SIGINT ignored, a Ctrl-C that stops
    the command does not reach them (Slurm jobs never see it)."""
    import signal
    import threading

    if kind != "local" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class CellJob:
    """What a cell's job runs: its notebook, with submitit's checkpoint hook, which stops the
    notebook and requeues the job when Slurm preempts it or its time limit nears."""

    def __init__(self, run: CellRun, executor: str, threads: int | None = None):
        self.run, self.executor, self.threads = run, executor, threads
        self.finished = False

    def __call__(self) -> dict:
        import submitit

        job = submitit.JobEnvironment()
        self.run.record["job"] = {"executor": self.executor, "id": job.job_id, "host": job.hostname}
        self.run.record["hardware"] = machine_facts()  # the machine the job landed on
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)} if self.threads else {}
        # A notebook ended by a signal (Slurm's SIGTERM on preemption or cancellation) is not a
        # failed cell: what Slurm does with the job next (requeue or not) decides.
        record = self.run.execute(env, final_on_signal=False)
        self.finished = True
        return record

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self.finished:  # a signal after the notebook ended: nothing to resume, keep the result
            return None
        self.run.stop()
        self.run.record.update(requeued=now(), requeues=self.run.record.get("requeues", 0) + 1)
        write_json(Path(self.run.folder) / RESULTS_FILE, {**self.run.record, "status": "queued"})
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)  # the record travels with it


def _slurm_message(folder: Path, job: dict) -> str | None:
    """Slurm's own last word in the job's log (a time limit, a cancellation), if any."""
    try:
        lines = (folder / JOBS_DIR / f"{job['id']}_0_log.out").read_text(errors="replace").splitlines()
    except OSError:
        return None
    said = [line.strip() for line in lines if "slurmstepd" in line]
    return said[-1] if said else None


def slurm_states(ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job id: from ``sacct`` (accounting), else from ``squeue``, which
    lists the jobs slurmctld still holds (pending, running and, for ``MinJobAge`` after they end,
    ended ones), on clusters without accounting or for jobs it has not recorded yet. A job that
    neither lists while ``squeue`` answers has ended long ago: ``ENDED``. When neither answers
    (the controller is down), the job is left out: the caller counts it as unknown, hence alive."""
    if not ids:
        return {}
    states = _slurm_table(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)]) or {}
    unlisted = [i for i in ids if i not in states]
    if unlisted:
        held = _slurm_table(["squeue", "-h", "--me", "--states=all", "-o", "%i|%T"])
        if held is not None:
            states.update({i: held.get(i, "ENDED") for i in unlisted})
    return states


def _slurm_table(argv: list[str]) -> dict[str, str] | None:
    """``JOBID|STATE`` lines of a Slurm command as {job id: state}; None if it does not answer
    (not installed, failing as sacct does without accounting, or silent for a minute)."""
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    states = {}
    for line in done.stdout.splitlines():
        job, _, state = line.partition("|")
        if job.strip() and state.strip():
            states[job.strip()] = state.split()[0].upper()  # "CANCELLED by 123" -> CANCELLED
    return states


def _job_state(job: dict, held=None, states: dict | None = None) -> str | None:
    """``queued`` or ``running`` while the job may still run the cell, else None (it ended).
    ``held``: the submitit job when this process submitted it (local); ``states``: Slurm's
    states from :func:`slurm_states`, when the caller asked for many jobs at once."""
    if job.get("executor") == "local":
        if held is not None:
            return None if held.done() else "running"
        import psutil

        try:
            process = psutil.Process(int(job["id"]))
            alive = process.status() != psutil.STATUS_ZOMBIE and "submitit" in " ".join(process.cmdline())
        except (psutil.Error, ValueError):
            alive = False
        return "running" if alive else None
    job_id = str(job["id"])
    state = (states if states is not None else slurm_states([job_id])).get(job_id, "UNKNOWN")
    if state not in _ALIVE:
        return None
    return "queued" if state in _WAITING else "running"


def cell_state(folder: Path, held=None, states: dict | None = None) -> dict:
    """A cell's state from its folder: planned, queued, running, done or failed, with its job
    and the error (a failed notebook's, or why a job ended without finishing it). A cell whose
    job may still run it is queued or running, whatever its last record says."""
    record, job = read_json_if_any(folder / RESULTS_FILE), read_json_if_any(folder / JOB_FILE)
    job_name = f"{job['executor']} {job['id']}" if job else None
    if record is None:
        return {"status": "queued" if job else "planned", "job": job_name, "seconds": None, "error": None}
    status = record.get("status")
    if job and status != "done":
        state = _job_state(job, held, states)
        if state is not None:  # queued until its notebook starts (again, after a requeue)
            status = "queued" if "queued" in (state, status) else "running"
            return {"status": status, "job": job_name, "seconds": None, "error": None}
        record = read_json_if_any(folder / RESULTS_FILE) or record  # it may have finished since the first read
        status = record.get("status")
        if status in ("queued", "running"):
            last = _slurm_message(folder, job) or log_tail(folder / "log.txt", 1)
            return {"status": "failed", "job": job_name, "seconds": None,
                    "error": f"{job_name} ended before the notebook finished (killed, time limit or node "
                             f"failure); log: {last or 'empty'}"}
    return {"status": status, "job": job_name, "seconds": record.get("seconds"), "error": record.get("error"),
            "metrics": record.get("metrics") or {}}


def _slurm_ids(runs: Path, cell_ids) -> list[str]:
    """The Slurm job ids of the cells not done, for one sacct call."""
    ids = []
    for cell_id in cell_ids:
        job = read_json_if_any(runs / cell_id / JOB_FILE)
        record = read_json_if_any(runs / cell_id / RESULTS_FILE) or {}
        if job and job.get("executor") == "slurm" and record.get("status") != "done":
            ids.append(str(job["id"]))
    return ids


class JobRunner:
    """Submits the cells of each phase as jobs and follows them until they end."""

    def __init__(self, runner: CellRunner, kind: str, options: dict, cap: int | None, poll: float | None = None):
        check_executor(kind)
        self.runner, self.kind, self.options, self.cap = runner, kind, options, cap
        self.poll = poll if poll is not None else (30.0 if kind == "slurm" else 1.0)
        self.free_slots = list(range(cap or 1))  # local executor: which GPUs a job gets
        self.gpus = [int(g) for g in runner.gpus if g.isdigit()]

    def _options(self, cell: Cell) -> JobOptions:
        return JobOptions.from_layers(cell.slurm, self.options, where=f"{cell.id}: slurm")

    def _submit(self, cell: Cell, declared: dict, position: str, parallel: int) -> dict:
        options = self._options(cell)
        folder = self.runner.runs / cell.id
        run = self.runner.prepare(cell, declared, processes=max(1, options.gpus))
        slot, visible, threads = None, [], options.cpus
        if self.kind == "local":
            slot = self.free_slots.pop(0)
            if options.gpus and len(self.gpus) >= (slot + 1) * options.gpus:
                visible = self.gpus[slot * options.gpus:(slot + 1) * options.gpus]
            threads = threads or max(1, (os.cpu_count() or 1) // parallel)  # cores shared as without jobs
        entry = {"cell": cell, "job": None, "slot": slot, "status": "queued", "position": position}
        try:
            executor = make_executor(self.kind, folder / JOBS_DIR, options, f"hnd-{cell.id.replace('/', '.')}",
                                     visible)
            with _jobs_ignore_ctrl_c(self.kind):
                job = executor.submit(CellJob(run, self.kind, threads))
        except Exception as exc:  # noqa: BLE001 - e.g. sbatch refusing (a submit limit): the others go on
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            error = f"submission failed: {reason}"
            write_json(folder / RESULTS_FILE, {**run.record, "status": "failed", "error": error})
            self.runner.log(f"{position} {cell.id}: {error}")
            return {**entry, "status": "failed", "error": error}
        write_json(folder / JOB_FILE, {"executor": self.kind, "id": str(job.job_id), "submitted": now(),
                                       "slot": slot, "options": {**options.__dict__, "setup": list(options.setup)}})
        self.runner.set_status(cell.id, "queued")
        self.runner.log(f"{position} {cell.id}: submitted as {self.kind} job {job.job_id}")
        return {**entry, "job": job}

    def run_phase(self, cells: list[Cell], declared: dict[str, dict], positions: dict[str, str]) -> dict[str, dict]:
        """Run ``cells`` (none finished before) as jobs; their final results.json records."""
        runs = self.runner.runs
        waiting, active, records = [], {}, {}
        states = slurm_states(_slurm_ids(runs, [c.id for c in cells]))
        for cell in cells:  # jobs an earlier command submitted and that may still run are followed
            state = cell_state(runs / cell.id, states=states)
            if state["status"] in ("queued", "running"):
                slot = (read_json_if_any(runs / cell.id / JOB_FILE) or {}).get("slot")
                if slot in self.free_slots and self.kind == "local":
                    self.free_slots.remove(slot)  # its GPUs stay its own
                else:
                    slot = None
                active[cell.id] = {"cell": cell, "job": None, "slot": slot, "status": state["status"],
                                   "position": positions[cell.id]}
                self.runner.set_status(cell.id, state["status"])
                self.runner.log(f"{positions[cell.id]} {cell.id}: {state['status']} as {state['job']}, "
                                "submitted before; following it")
            else:
                waiting.append(cell)
        parallel = min(self.cap or len(cells), len(cells)) or 1  # a phase of one cell keeps every core
        while waiting or active:
            while waiting and (self.cap is None or len(active) < self.cap) and (self.kind != "local" or self.free_slots):
                cell = waiting.pop(0)
                entry = self._submit(cell, declared[cell.notebook], positions[cell.id], parallel)
                if entry["status"] == "failed":
                    if entry["slot"] is not None:
                        self.free_slots.append(entry["slot"])
                    self.runner.set_status(cell.id, "failed", None, entry["error"])
                    records[cell.id] = read_json_if_any(runs / cell.id / RESULTS_FILE) or {"status": "failed"}
                else:
                    active[cell.id] = entry
            if not active:
                break
            time.sleep(self.poll)
            states = slurm_states(_slurm_ids(runs, active))
            for cell_id, entry in list(active.items()):
                state = cell_state(runs / cell_id, entry["job"], states)
                if state["status"] == entry["status"]:
                    continue
                entry["status"] = state["status"]
                self.runner.set_status(cell_id, state["status"], state.get("seconds"), state.get("error"))
                seconds = f" in {state['seconds']:.1f} s" if state.get("seconds") is not None else ""
                self.runner.log(f"{entry['position']} {cell_id}: {state['status']}{seconds}"
                                + (f" ({state['error']})" if state.get("error") else ""))
                if state["status"] in ("done", "failed"):
                    if entry["slot"] is not None:
                        self.free_slots.append(entry["slot"])
                    del active[cell_id]
                    records[cell_id] = {**(read_json_if_any(runs / cell_id / RESULTS_FILE) or {}), **state}
        return records


def grid_status(runs: Path) -> list[dict]:
    """Each cell of the grid in ``runs``, in run order: id, status, job, seconds, error, and
    for a running cell its log's last line."""
    grid = read_json_if_any(runs / GRID_FILE)
    if grid is None:
        raise HndError(f"no grid in {runs}: start it with hnd book run (its runs folder holds {GRID_FILE})")
    rows = []
    states = slurm_states(_slurm_ids(runs, [cell["id"] for cell in grid.get("cells", [])]))
    for cell in grid.get("cells", []):
        folder = runs / cell["id"]
        state = cell_state(folder, states=states)
        if state["status"] in ("queued", "running"):
            state["error"] = None
            state["last"] = log_tail(folder / "log.txt", 1)
        rows.append({"id": cell["id"], **state})
    return rows


def status_table(rows: list[dict]) -> str:
    """``hnd book status`` as plain text: cell, state, job, seconds, error or last log line."""
    table = [("cell", "state", "job", "seconds", "detail")]
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if isinstance(row.get("seconds"), (int, float)) else "-"
        table.append((row["id"], row["status"], row.get("job") or "-", seconds,
                      row.get("error") or row.get("last") or ""))
    lines = plain_table(table, right=(3,))
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append(", ".join(f"{n} {status}" for status, n in counts.items()) + f" of {len(rows)} cells")
    return "\n".join(lines)
