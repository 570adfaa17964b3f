"""The slurm executor against a real Slurm: Debian's slurm-wlm on this machine as a single node
without accounting (``slurm_cluster.py``), as many small clusters run. A grid runs to the end; a
job cancelled mid-cell (as an admin, a node failure or an out-of-memory kill ends it) is noticed
through ``squeue`` when ``sacct`` has no answer, and the next run resumes the cell from its last
checkpoint; a job requeued by ``scontrol requeue`` runs the cell again, resumed, to the end.
Then once with accounting (slurmdbd on MariaDB): the cancelled job's state comes from ``sacct``.
A step that asks for GPUs gets them from Slurm (the node's two ``gres/gpu``, files in place of
device nodes), and one that asks for more than the node has is refused by ``sbatch``; with
accounting, ``sbatch`` refuses a job over a QOS submit limit. Either way only that cell fails.

What still uses the stand-in of ``fake_slurm.py`` (``test_cluster.py``): a job ended by its time
limit (Slurm's shortest is a minute; submitit's signal-and-requeue path runs in the
local-executor test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import slurm_cluster
from hnd.book.cluster import cell_state, grid_status, slurm_states
from hnd.files import read_json
from test_cluster import _epoch, _job_id, _wait, project, write_profile  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(slurm_cluster.missing() is not None, reason=str(slurm_cluster.missing()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    print(f"\na real single-node Slurm started in {started.started_s:.1f} s")
    yield started
    started.stop()


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    return cluster


def _book(project: Path, *args: str, output) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hnd", "book", *args], cwd=project, stdout=output,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _grid(project: Path, epochs: int, pause: float, cells=(1,)) -> Path:
    write_profile(project, "grid", {"steps": [{"notebook": "02_train", "grid": {"x": list(cells)},
                                               "parameters": {"epochs": epochs, "pause": pause}}]})
    return project / "runs" / "book" / "grid"


RUN = ["run", "--profile", "grid", "--executor", "slurm", "--partition", "debug", "--poll", "0.5"]


def test_a_grid_runs_to_the_end_on_a_real_slurm(project, slurm_env):
    runs = _grid(project, epochs=2, pause=0.0, cells=(1, 2))
    with open(project / "run.log", "w") as log:
        assert _book(project, *RUN, output=log).wait(timeout=300) == 0
    text = (project / "run.log").read_text()
    assert "2 of 2 cells finished" in text, text
    for cell in ("x-1", "x-2"):
        record = read_json(runs / "02_train" / cell / "results.json")
        assert record["status"] == "done" and record["job"]["executor"] == "slurm"
        assert record["job"]["id"] == _job_id(runs, cell) and record["job"]["host"] == slurm_env.node
        # The cell's result is written before its job's process exits: Slurm may still say RUNNING.
        job = _job_id(runs, cell)
        _wait(lambda: slurm_env.job_state(job) not in ("RUNNING", "COMPLETING"), "the job to leave the node", 60)
        assert slurm_env.job_state(job) == "COMPLETED"
    assert slurm_states([_job_id(runs, "x-1")]) == {_job_id(runs, "x-1"): "COMPLETED"}  # without sacct


def test_a_cancelled_job_is_noticed_and_its_cell_resumes(project, slurm_env):
    runs = _grid(project, epochs=12, pause=0.5)  # 5 s of epochs left when it is cancelled
    with open(project / "first.log", "w") as log:
        first = _book(project, *RUN, output=log)
        _wait(lambda: _epoch(runs, "x-1") >= 2, "the cell to train on the node", timeout=180)
        job = _job_id(runs, "x-1")
        assert [row["status"] for row in grid_status(runs)] == ["running"]
        slurm_env.run("scancel", job)
        assert first.wait(timeout=120) == 1  # noticed: the command ends, the cell failed
    text = (project / "first.log").read_text()
    assert f"slurm {job} ended before the notebook finished" in text, text
    assert cell_state(runs / "02_train" / "x-1")["status"] == "failed"

    with open(project / "second.log", "w") as log:
        assert _book(project, *RUN, output=log).wait(timeout=300) == 0
    record = read_json(runs / "02_train" / "x-1" / "results.json")
    assert record["status"] == "done" and _job_id(runs, "x-1") != job
    assert record["metrics"]["resumed_at"] >= 2  # from its last checkpoint, not from the start


def test_a_requeued_job_runs_its_cell_again_resumed(project, slurm_env):
    runs = _grid(project, epochs=10, pause=0.5)
    with open(project / "run.log", "w") as log:
        command = _book(project, *RUN, output=log)
        _wait(lambda: _epoch(runs, "x-1") >= 2, "the cell to train on the node", timeout=180)
        job = _job_id(runs, "x-1")
        slurm_env.run("scontrol", "requeue", job)
        _wait(lambda: slurm_env.job_state(job) == "PENDING", "the job to be back in the queue")
        assert command.wait(timeout=300) == 0  # it starts again by itself once Slurm's hold ends
    record = read_json(runs / "02_train" / "x-1" / "results.json")
    assert record["status"] == "done" and _job_id(runs, "x-1") == job  # the same job, run again
    assert record["metrics"]["resumed_at"] >= 2
    epochs = (runs / "02_train" / "x-1" / "run" / "epochs.txt").read_text().split()
    assert sorted(set(map(int, epochs))) == list(range(10))


def test_status_tells_planned_queued_running_failed_and_done_apart(project, slurm_env):
    """A cell asking for both CPUs waits in Slurm's queue while another holds one: queued, not
    running; the step after them is planned; a cancelled job's cell is failed."""
    write_profile(project, "grid", {"steps": [
        {"notebook": "02_train", "grid": {"x": [1]}, "parameters": {"epochs": 1, "pause": 0.0}},
        {"notebook": "02_train", "name": "long", "grid": {"x": [2, 3]}, "parameters": {"epochs": 60, "pause": 0.5},
         "slurm": {"cpus": os.cpu_count()}},
        {"notebook": "02_train", "name": "after", "grid": {"x": [4]}},
    ]})
    runs = project / "runs" / "book" / "grid"
    with open(project / "run.log", "w") as log:
        command = _book(project, *RUN, output=log)
        try:
            _wait(lambda: max(_epoch(runs, "long_x-2"), _epoch(runs, "long_x-3")) >= 1, "a long cell to train",
                  timeout=240)
            rows = {row["id"]: row["status"] for row in grid_status(runs)}
            running = "02_train/long_x-2" if rows["02_train/long_x-2"] == "running" else "02_train/long_x-3"
            waiting = ({"02_train/long_x-2", "02_train/long_x-3"} - {running}).pop()
            assert rows == {"02_train/x-1": "done", running: "running", waiting: "queued",
                            "02_train/after_x-4": "planned"}, rows
            slurm_env.run("scancel", _job_id(runs, running.split("/")[1]))
            _wait(lambda: {row["id"]: row["status"] for row in grid_status(runs)}[running] == "failed",
                  "the cancelled cell to read failed")
        finally:
            os.killpg(command.pid, 9)  # stop following; then end every job of the test
            command.wait(timeout=60)
            slurm_env.run("scancel", "--me", check=False)


@pytest.fixture(scope="module")
def accounting_cluster(tmp_path_factory):
    """The same single node with accounting: slurmdbd on a MariaDB server of its own."""
    reason = slurm_cluster.missing(accounting=True)
    if reason:
        pytest.skip(reason)
    started = slurm_cluster.start(tmp_path_factory.mktemp("slurm-accounting"), accounting=True)
    print(f"\na single-node Slurm with slurmdbd and MariaDB started in {started.started_s:.1f} s")
    yield started
    started.stop()


def test_with_accounting_sacct_tells_the_cancelled_job_and_the_cell_resumes(project, accounting_cluster,
                                                                             monkeypatch):
    """Where accounting answers, sacct is where the job states come from: the cancelled job
    is CANCELLED there, the command notices it, and the next run resumes the cell."""
    for key, value in accounting_cluster.env.items():
        monkeypatch.setenv(key, value)
    runs = _grid(project, epochs=10, pause=0.5)
    with open(project / "first.log", "w") as log:
        first = _book(project, *RUN, output=log)
        _wait(lambda: _epoch(runs, "x-1") >= 2, "the cell to train on the node", timeout=180)
        job = _job_id(runs, "x-1")
        accounting_cluster.run("scancel", job)
        assert first.wait(timeout=120) == 1
    assert f"slurm {job} ended before the notebook finished" in (project / "first.log").read_text()
    accounted = accounting_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job).stdout
    assert accounted.startswith(f"{job}|CANCELLED") and slurm_states([job]) == {job: "CANCELLED"}

    with open(project / "second.log", "w") as log:
        assert _book(project, *RUN, output=log).wait(timeout=300) == 0
    record = read_json(runs / "02_train" / "x-1" / "results.json")
    assert record["status"] == "done" and record["metrics"]["resumed_at"] >= 2
    second = _job_id(runs, "x-1")
    _wait(lambda: slurm_states([second]).get(second, "RUNNING") not in ("RUNNING", "COMPLETING"), "the job to end", 60)
    assert accounting_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", second).stdout \
        .startswith(f"{second}|COMPLETED")


def test_gpus_a_step_asks_for_are_allocated_by_slurm_or_refused_at_submission(project, slurm_env):
    """A step with ``slurm: {gpus: 2}`` is a job that Slurm gives the node's two GPUs, and its
    cell is told to train with one process per GPU; a step asking for more GPUs than any node
    has is refused by sbatch, and only its cell fails, with Slurm's words."""
    write_profile(project, "grid", {"steps": [
        {"notebook": "02_train", "name": "wide", "grid": {"x": [1]}, "parameters": {"epochs": 1},
         "slurm": {"gpus": slurm_cluster.GPUS}},
        {"notebook": "02_train", "name": "wider", "grid": {"x": [2]}, "parameters": {"epochs": 1},
         "slurm": {"gpus": slurm_cluster.GPUS + 1}},
    ]})
    runs = project / "runs" / "book" / "grid"
    with open(project / "run.log", "w") as log:
        assert _book(project, *RUN, output=log).wait(timeout=300) == 1
    text = (project / "run.log").read_text()
    metrics = read_json(runs / "02_train" / "wide_x-1" / "metrics.json")
    assert metrics["processes"] == slurm_cluster.GPUS and metrics["gpus_on_node"] == str(slurm_cluster.GPUS), text
    job = slurm_env.run("scontrol", "-d", "-o", "show", "job", _job_id(runs, "wide_x-1")).stdout
    assert f" JOB_GRES=gpu:{slurm_cluster.GPUS} " in job, job  # what Slurm allocated to the job
    assert re.search(r"02_train/wider_x-2 +failed .*submission failed: .*Requested node configuration is not "
                     r"available", text), text


def test_with_accounting_sbatch_refuses_a_job_over_the_qos_submit_limit(project, accounting_cluster, monkeypatch):
    """Under a QOS that lets a user have one job at a time (``MaxSubmitJobsPerUser=1``), sbatch
    refuses the second cell of a step: only that cell fails, with Slurm's words, and the next
    run submits it, the first one's result kept."""
    for key, value in accounting_cluster.env.items():
        monkeypatch.setenv(key, value)
    runs = _grid(project, epochs=4, pause=0.5, cells=(1, 2))
    limited = [*RUN, f"--sbatch=--qos={slurm_cluster.ONE_AT_A_TIME}"]
    with open(project / "first.log", "w") as log:
        assert _book(project, *limited, output=log).wait(timeout=300) == 1
    text = (project / "first.log").read_text()
    refused = re.findall(r"(02_train/x-\d) +failed .*submission failed: .*Job violates accounting/QOS policy "
                         r"\(job submit limit", text)
    assert len(refused) == 1, text
    done = ({"02_train/x-1", "02_train/x-2"} - set(refused)).pop()
    assert cell_state(runs / done)["status"] == "done"

    with open(project / "second.log", "w") as log:
        assert _book(project, *limited, output=log).wait(timeout=300) == 0
    text = (project / "second.log").read_text()
    assert f"{refused[0]}: submitted as slurm job" in text and re.search(rf"{done} +done \(cached\)", text), text
