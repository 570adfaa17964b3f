"""The grid as cluster jobs (hnd.book.cluster): job options and the sbatch file they make,
submitit's local executor through a preemption, a killed job, a stopped command and a
resubmission, and the slurm executor against a stand-in for sbatch, srun and sacct."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import fake_slurm
from conftest import error
from hnd.book.cells import JOB_OPTIONS, JobOptions, parse_time, sbatch_flags
from hnd.book.cluster import cell_state, grid_status, make_executor, status_table
from hnd.book.grid import load_profile, plan_cells, run_grid
from hnd.files import read_json
from hnd.cli import main

ROOT = Path(__file__).resolve().parents[1]
# A training chapter in miniature: "epochs" that each take `pause` seconds and keep a last
# checkpoint, resumed from when the cell runs again (as train_or_resume does with last.pt).
PARAMETERS = '''x: int = 1  # the cell's number
epochs: int = 3  # epochs to run
pause: float = 0.0  # seconds per epoch
output_dir: str = ""  # the cell folder (set by the runner)
profile: str = "manual"  # the profile (set by the runner)
processes: int = 1  # training processes (set by the runner)'''
TRAIN = '''import json, os, pathlib, time  # not hnd: a kernel without torch starts in a second
run = pathlib.Path(output_dir, "run")
run.mkdir(exist_ok=True)
last = run / "last.json"
start = json.loads(last.read_text())["epoch"] + 1 if last.exists() else 0
for epoch in range(start, epochs):
    time.sleep(pause)
    with open(run / "epochs.txt", "a") as f:
        f.write(f"{epoch}\\n")
    (run / "last.tmp").write_text(json.dumps({"epoch": epoch}))
    (run / "last.tmp").replace(last)
pathlib.Path(output_dir, "metrics.json").write_text(json.dumps(
    {"test_top1": float(x), "resumed_at": start, "processes": processes,
     "gpus_on_node": os.environ.get("SLURM_GPUS_ON_NODE")}))'''


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    (root / "notebooks" / "profiles").mkdir(parents=True)
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                "language_info": {"name": "python"}})
    params = new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [new_markdown_cell("# Training in miniature"), params, new_code_cell(TRAIN)]
    nbformat.write(nb, root / "notebooks" / "02_train.ipynb")
    return root


def write_profile(root: Path, name: str, doc: dict) -> None:
    (root / "notebooks" / "profiles" / f"{name}.yaml").write_text(yaml.safe_dump(doc))


def test_job_options_and_the_sbatch_file_they_make(project, tmp_path, monkeypatch):
    assert [parse_time(t) for t in (90, "90", "1:30", "2:00:00", "1-12", "2-00:00:00", "0:00:30")] == \
        [90, 90, 2, 120, 2160, 2880, 1]
    assert sbatch_flags(["--qos=high", "exclusive", "--mail-type=END"]) == \
        {"qos": "high", "exclusive": True, "mail_type": "END"}
    for bad, message in ((["qos high"], "is not an sbatch flag"), ([3], "is not an sbatch flag")):
        assert message in error(sbatch_flags, bad)
    # Profile, then step, then command line.
    write_profile(project, "cluster", {"slurm": {"partition": "gpu", "gpus": 4, "cpus": 16, "time": "2-00:00:00",
                                                 "account": "proj", "sbatch": ["--qos=high", "--exclusive"],
                                                 "setup": ["module load cuda"]},
                                       "steps": [{"notebook": "02_train", "slurm": {"gpus": 0, "time": 30}}]})
    profile = load_profile("cluster", project)
    options = JobOptions.from_layers(profile.slurm, profile.steps[0]["slurm"], {"mem": "64G"})
    assert (options.gpus, options.time, options.cpus, options.mem) == (0, 30, 16, "64G")
    options = JobOptions.from_layers(profile.slurm, {"time": "1:30:00"})
    bin_dir, _ = fake_slurm.install(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = make_executor("slurm", tmp_path / "jobs", options, "hnd-cell")._make_submission_file_text("CMD", "u")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--cpus-per-task=16", "--time=90", "--account=proj",
                 "--qos=high", "--job-name=hnd-cell", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --exclusive\n" in script and "module load cuda\n" in script
    # The paper's grid: a GPU for each training and rate cell, none for the chapters that read results.
    paper = load_profile("paper", ROOT)
    gpus = {cell.id: JobOptions.from_layers(cell.slurm).gpus for cell in plan_cells(paper, tmp_path, tmp_path)}
    assert {g for c, g in gpus.items() if c.startswith(("02_train/", "03_rate_accuracy/"))} == {1}
    assert {g for c, g in gpus.items() if not c.startswith(("02_train/", "03_rate_accuracy/"))} == {0}
    assert JobOptions.from_layers(paper.slurm).time == 1440
    # Mistakes are one line, found before any job starts.
    cases = {"bad_key": ({"slurm": {"partion": "gpu"}}, "slurm: unknown job option 'partion'; valid: partition"),
             "bad_time": ({"slurm": {"time": "soon"}}, "time: 'soon' is not a time limit; valid: minutes"),
             "bad_cpus": ({"steps_slurm": {"cpus": 0}}, "step 1: slurm: cpus must be at least 1, got 0"),
             "bad_gpus": ({"slurm": {"gpus": "two"}}, "slurm: gpus must be a number, got 'two'")}
    for name, (doc, message) in cases.items():
        step = {"notebook": "02_train", **({"slurm": doc.pop("steps_slurm")} if "steps_slurm" in doc else {})}
        write_profile(project, name, {**doc, "steps": [step]})
        assert message in error(load_profile, name, project) and "\n" not in error(load_profile, name, project)


def test_cli_mistakes_about_jobs_are_one_line(project, tmp_path, monkeypatch, capsys):
    write_profile(project, "toy", {"steps": [{"notebook": "02_train"}]})
    monkeypatch.chdir(project)
    assert main(["book", "run", "--profile", "toy", "--partition", "gpu", "--time", "60"]) == 2
    assert capsys.readouterr().err == ("hnd: error: --partition, --time only apply to jobs; add --executor slurm "
                                       "or --executor local\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here
    assert main(["book", "run", "--profile", "toy", "--executor", "slurm"]) == 2
    assert "--executor slurm needs Slurm's sbatch, srun, squeue on PATH" in capsys.readouterr().err
    assert not (project / "runs").exists()
    squeue = tmp_path / "squeue"  # Slurm's commands, but a controller that does not answer
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (tmp_path / tool).symlink_to(squeue)
    squeue.chmod(0o755)
    assert main(["book", "run", "--profile", "toy", "--executor", "slurm"]) == 2
    assert capsys.readouterr().err == ("hnd: error: --executor slurm: the Slurm controller does not answer (squeue: "
                                       "slurm_load_jobs error: Unable to contact slurm controller); check `scontrol "
                                       "ping` or run the grid with --executor local\n")
    assert not (project / "runs").exists()
    assert main(["book", "status", "--profile", "toy"]) == 2
    assert "no grid in " in capsys.readouterr().err


def _epoch(runs: Path, cell: str) -> int:
    try:
        return json.loads((runs / "02_train" / cell / "run" / "last.json").read_text())["epoch"]
    except (OSError, ValueError):
        return -1


def _wait(condition, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _job_id(runs: Path, cell: str) -> str:
    return read_json(runs / "02_train" / cell / "job.json")["id"]


def _book(project: Path, *args: str, output=subprocess.PIPE) -> subprocess.Popen:
    """``hnd book ARGS`` in a process group of its own, as a terminal runs a command: Ctrl-C
    acts (a test run started in the background by a shell inherits SIGINT ignored)."""
    return subprocess.Popen([sys.executable, "-m", "hnd", "book", *args], cwd=project, stdout=output,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_local_jobs_survive_preemption_kills_and_a_stopped_command(project):
    """Two cells as jobs of submitit's local executor. One is preempted (USR2, as Slurm sends
    before a time limit or a preemption): submitit requeues it and it resumes from its last
    checkpoint. The other's job is killed outright: the cell fails with the log's last line,
    and the next run resubmits it, resuming. Then the command itself is killed while a job
    runs: the job goes on, and the same command follows it to the end."""
    write_profile(project, "toy", {"jobs": 2, "slurm": {"time": 10},
                                   "steps": [{"notebook": "02_train", "grid": {"x": [1, 2]},
                                              "parameters": {"epochs": 40, "pause": 0.15}}]})
    runs = project / "runs" / "book" / "toy"
    command = ["run", "--profile", "toy", "--executor", "local", "--poll", "0.2"]
    first = _book(project, *command)
    _wait(lambda: _epoch(runs, "x-1") >= 2 and _epoch(runs, "x-2") >= 2, "both cells to train")
    rows = {row["id"]: row for row in grid_status(runs)}
    assert [rows[c]["status"] for c in ("02_train/x-1", "02_train/x-2")] == ["running", "running"]
    assert rows["02_train/x-1"]["job"] == f"local {_job_id(runs, 'x-1')}"

    controller = psutil.Process(int(_job_id(runs, "x-1")))  # submitit's local job: a controller and its task
    task = next(p for p in controller.children() if "submitit.core._submit" in " ".join(p.cmdline()))
    os.kill(task.pid, signal.SIGUSR2)
    killed = psutil.Process(int(_job_id(runs, "x-2")))
    for process in [killed, *killed.children(recursive=True)]:  # as Slurm ends a job: every process at once
        process.kill()
    out, _ = first.communicate(timeout=180)
    assert first.returncode == 1, out
    assert "02_train/x-1: queued" in out  # requeued, then running again

    one = read_json(runs / "02_train" / "x-1" / "results.json")
    assert one["status"] == "done" and one["requeues"] == 1 and one["job"]["executor"] == "local"
    assert one["metrics"]["resumed_at"] >= 2  # resumed from its checkpoint, not from the start
    epochs = (runs / "02_train" / "x-1" / "run" / "epochs.txt").read_text().split()
    assert sorted(set(map(int, epochs))) == list(range(40))
    state = cell_state(runs / "02_train" / "x-2")
    assert state["status"] == "failed"
    assert state["error"].startswith(f"local {_job_id(runs, 'x-2')} ended before the notebook finished")
    assert "log: " in state["error"]
    table = status_table(grid_status(runs))
    assert "02_train/x-2  failed" in table and "1 done, 1 failed of 2 cells" in table

    # Run again: the finished cell is skipped, the killed one resubmitted; then Ctrl-C, which a
    # terminal sends to the command's whole process group (its local jobs' processes included).
    killed_job = _job_id(runs, "x-2")
    with open(project / "second.log", "w") as output:
        second = _book(project, *command, output=output)
    # the command has logged the submission: it ignores Ctrl-C only while it starts a local job
    _wait(lambda: (runs / "02_train" / "x-2" / "job.json").is_file() and _job_id(runs, "x-2") != killed_job
          and "x-2: submitted as local job" in (project / "second.log").read_text()
          and read_json(runs / "02_train" / "x-2" / "results.json")["status"] == "running", "the resubmitted job")
    os.killpg(second.pid, signal.SIGINT)
    assert second.wait(timeout=60) == 130
    assert "stopped following the jobs; they go on" in (project / "second.log").read_text()
    job = _job_id(runs, "x-2")
    assert cell_state(runs / "02_train" / "x-2")["status"] == "running"  # the job goes on without the command

    lines = []
    summaries = run_grid("toy", root=project, executor="local", poll=0.2, log=lines.append)
    assert [(s["status"], s["skipped"]) for s in summaries] == [("done", True), ("done", False)]
    assert any(f"running as local {job}, submitted before; following it" in line for line in lines)
    assert _job_id(runs, "x-2") == job  # followed, not submitted again
    two = read_json(runs / "02_train" / "x-2" / "results.json")
    assert two["metrics"]["resumed_at"] >= 2 and two["status"] == "done"
    assert (runs / "02_train" / "x-2" / "log.txt").read_text().count("--- ") == 2  # both attempts' logs kept
    assert [c["status"] for c in read_json(runs / "grid.json")["cells"]] == ["done", "done"]


def test_slurm_jobs_through_sbatch_and_sacct(project, tmp_path, monkeypatch, capsys):
    """The slurm executor against a stand-in Slurm: the profile's options reach the batch file,
    a cell given two GPUs is told to train with two processes, sacct's states are read, and a
    job that hit its time limit shows Slurm's message and is resubmitted (``test_slurm.py``
    runs the rest against a real Slurm)."""
    bin_dir, state = fake_slurm.install(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    write_profile(project, "grid", {"slurm": {"partition": "gpu", "time": "0:30:00", "account": "proj"},
                                    "steps": [{"notebook": "02_train", "grid": {"x": [1]}},
                                              {"notebook": "02_train", "name": "wide", "grid": {"x": [2]},
                                               "slurm": {"gpus": 2}}]})
    monkeypatch.chdir(project)
    assert main(["book", "run", "--profile", "grid", "--executor", "slurm", "--poll", "0.2",
                 "--sbatch=--qos=high", "--cpus-per-job", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 cells finished" in out
    runs = project / "runs" / "book" / "grid"
    assert [_job_id(runs, c) for c in ("x-1", "wide_x-2")] == ["1", "2"]
    first, wide = ((state / f"{n}.sbatch").read_text() for n in (1, 2))
    for line in ("--partition=gpu", "--time=30", "--account=proj", "--qos=high", "--cpus-per-task=3"):
        assert f"#SBATCH {line}\n" in first and f"#SBATCH {line}\n" in wide
    assert "--gpus-per-node" not in first and "#SBATCH --gpus-per-node=2\n" in wide
    assert read_json(runs / "02_train" / "x-1" / "metrics.json")["processes"] == 1
    assert read_json(runs / "02_train" / "wide_x-2" / "metrics.json")["processes"] == 2
    assert read_json(runs / "02_train" / "x-1" / "results.json")["job"] == \
        {"executor": "slurm", "id": "1", "host": socket.gethostname()}

    # A job that Slurm ended at its time limit while the notebook ran.
    cell = runs / "02_train" / "x-1"
    record = read_json(cell / "results.json")
    (cell / "results.json").write_text(json.dumps({**record, "status": "running"}))
    (state / "1.state").write_text("TIMEOUT")
    with open(cell / "jobs" / "1_0_log.out", "a") as log:
        log.write("slurmstepd: error: *** JOB 1 ON fakenode CANCELLED AT 2026-12-02T10:00:00 DUE TO TIME LIMIT ***\n")
    assert main(["book", "status", "--profile", "grid"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"02_train/x-1 +failed +slurm 1 .*DUE TO TIME LIMIT \*\*\*", out), out
    assert main(["book", "status", "--profile", "grid", "--json"]) == 1
    assert [row["status"] for row in json.loads(capsys.readouterr().out)] == ["failed", "done"]
    assert main(["book", "run", "--profile", "grid", "--executor", "slurm", "--poll", "0.2"]) == 0
    assert "02_train/x-1: submitted as slurm job 3" in capsys.readouterr().out
    assert cell_state(cell)["status"] == "done"

    _wait(lambda: (state / "3.rc").is_file(), "job 3 to end")  # a job outlives its notebook a little


def test_the_stand_in_sbatch_runs_its_own_copy_of_the_script(tmp_path):
    """As Slurm does: the job still runs when the submitted file is gone right after sbatch
    returns (submitit moves it then; a job that opened the file itself failed with exit 127)."""
    bin_dir, state = fake_slurm.install(tmp_path / "slurm")
    script, marker, late = tmp_path / "job.sh", tmp_path / "ran", tmp_path / "late"
    script.write_text(f"#!/bin/bash\ntouch {marker}\n")
    late.mkdir()  # a bash that starts the job only once the submitted file is gone: the race, every time
    (late / "bash").write_text(f'#!/bin/sh\nwhile [ -e {script} ]; do sleep 0.02; done\n'
                               f'exec {shutil.which("bash")} "$@"\n')
    (late / "bash").chmod(0o755)
    env = dict(os.environ, FAKE_SLURM_STATE=str(state), PATH=f"{late}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run([str(bin_dir / "sbatch"), str(script)], env=env, capture_output=True, text=True)
    script.unlink()
    assert done.stdout.strip() == "Submitted batch job 1"
    _wait(lambda: (state / "1.rc").is_file(), "job 1 to end")
    assert (state / "1.rc").read_text().strip() == "0" and marker.is_file()


def test_every_job_flag_of_the_command_is_a_job_option():
    import hnd.cli

    assert set(hnd.cli._JOB_FLAGS) == set(JOB_OPTIONS) - {"setup", "requeues"}  # those two: profiles only


GATHER = '''import json, pathlib  # a chapter that reads the training runs, as the results chapter does
found = sorted(p.parent.name for p in pathlib.Path(runs).glob("02_train/*/metrics.json"))
pathlib.Path(output_dir, "metrics.json").write_text(json.dumps({"read": found}))'''


def test_a_chapter_runs_again_when_a_run_it_reads_finishes_again(project):
    """A chapter reading the runs folder ({out}) is not skipped as cached once a cell of an
    earlier phase has finished again (a killed cell resubmitted): it would show stale numbers."""
    nb = nbformat.read(project / "notebooks" / "02_train.ipynb", as_version=4)
    params = new_code_cell('runs: str = ""  # the runs folder\noutput_dir: str = ""\nprofile: str = "manual"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [new_markdown_cell("# Results in miniature"), params, new_code_cell(GATHER)]
    nbformat.write(nb, project / "notebooks" / "04_results.ipynb")
    write_profile(project, "toy", {"jobs": 2, "steps": [{"notebook": "02_train", "grid": {"x": [1, 2]}},
                                                        {"notebook": "04_results", "parameters": {"runs": "{out}"}}]})
    runs = project / "runs" / "book" / "toy"
    assert [s["status"] for s in run_grid("toy", root=project, log=lambda line: None)] == ["done"] * 3
    lines = []
    assert all(s["skipped"] for s in run_grid("toy", root=project, log=lines.append)), lines
    cell = runs / "02_train" / "x-2"
    (cell / "metrics.json").unlink()  # a cell that failed and whose rerun finishes later
    (cell / "results.json").write_text(json.dumps({**read_json(cell / "results.json"), "status": "failed"}))
    lines = []
    summaries = run_grid("toy", root=project, log=lines.append)
    assert [(s["status"], s["skipped"]) for s in summaries] == [("done", True), ("done", False), ("done", False)]
    assert any("04_results/default: 02_train/x-2 finished again since it ran" in line for line in lines), lines
    assert read_json(runs / "04_results" / "default" / "metrics.json")["read"] == ["x-1", "x-2"]
