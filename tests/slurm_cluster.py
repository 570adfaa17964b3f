"""A real single-node Slurm for the cluster tests: Debian's slurm-wlm (22.05) and munge on this
machine, configured in a folder of its own (no cgroups, no accounting daemon, as on many small
clusters) and stopped at the end.

``start(folder)`` writes ``slurm.conf``, starts munged (if none runs), slurmctld and slurmd on
free ports, waits until the node takes jobs and returns a :class:`Cluster` whose ``env`` points
Slurm's commands (and submitit, which calls them) at it. It needs root and the packages:
``./run.sh test`` installs them as it installs Chromium.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "srun")


def missing() -> str | None:
    """Why a real Slurm cannot start here, or None."""
    absent = [tool for tool in (*DAEMONS, *CLIENTS) if shutil.which(tool) is None and
              not Path(f"/usr/sbin/{tool}").exists()]
    if absent:
        return f"Slurm is not installed (no {', '.join(absent)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a Slurm test cluster is started as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Cluster:
    folder: Path
    node: str
    env: dict = field(default_factory=dict)  # SLURM_CONF for the commands and submitit
    started_s: float = 0.0  # how long starting it took
    processes: list = field(default_factory=list)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster."""
        return subprocess.run(list(argv), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=60, check=check)

    def job_state(self, job_id: str) -> str | None:
        """The job's state as slurmctld reports it (kept MinJobAge after it ends), or None."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState")

    def stop(self) -> None:
        """Shut the daemons down (munged stays: it may serve others), killing what lingers."""
        self.run("scontrol", "shutdown", check=False)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _config(folder: Path, node: str, cpus: int, memory_mb: int) -> str:
    return f"""\
ClusterName=hndtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=10
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _munged_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


def start(folder: str | Path, timeout_s: float = 120.0) -> Cluster:
    """Start the single-node cluster configured in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, node, cpus, memory_mb))
    cluster = Cluster(folder, node, {"SLURM_CONF": str(conf)})
    begin = time.monotonic()
    if not _munged_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _daemon("munged")], check=True, timeout=30)
    env = {**os.environ, **cluster.env}
    for daemon in ("slurmctld", "slurmd"):
        cluster.processes.append(subprocess.Popen([_daemon(daemon), "-D", "-f", str(conf)], env=env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                  start_new_session=True))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            cluster.started_s = time.monotonic() - begin
            return cluster
        if any(p.poll() is not None for p in cluster.processes):
            break
        time.sleep(0.5)
    logs = " | ".join((folder / f"{d}.log").read_text()[-300:] for d in ("slurmctld", "slurmd")
                      if (folder / f"{d}.log").exists())
    cluster.stop()
    raise RuntimeError(f"the test Slurm did not come up within {timeout_s:.0f} s: {logs}")
