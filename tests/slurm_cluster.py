"""A real single-node Slurm for the cluster tests: Debian's slurm-wlm (22.05) and munge on this
machine, configured in a folder of its own (no cgroups) and stopped at the end; without an
accounting daemon, as on many small clusters, or with one (slurmdbd on a MariaDB server of its
own, in the same folder), which enforces QOS limits. The node has two GPUs for Slurm to count
and allocate (``gres/gpu``): two files of the folder stand in for their device nodes, and
nothing runs on them.

``start(folder, accounting=...)`` writes ``slurm.conf``, starts munged (if none runs), with
accounting MariaDB and slurmdbd (registering the cluster), then slurmctld and slurmd on free
ports, waits until the node takes jobs and returns a :class:`Cluster` whose ``env`` points
Slurm's commands (and submitit, which calls them) at it. It needs root and the packages:
``./run.sh test`` installs them as it installs Chromium.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "srun")
ACCOUNTING = ("slurmdbd", "sacctmgr", "mariadbd", "mariadb-install-db", "mariadb")


def missing(accounting: bool = False) -> str | None:
    """Why a real Slurm (``accounting``: with slurmdbd on MariaDB) cannot start here, or None."""
    tools = (*DAEMONS, *CLIENTS, *(ACCOUNTING if accounting else ()))
    absent = [tool for tool in tools if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if absent:
        packages = "slurm-wlm munge" + (" slurmdbd mariadb-server" if accounting else "")
        return f"Slurm is not installed (no {', '.join(absent)}; apt-get install {packages})"
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
        """End every job, shut the daemons down (munged stays: it may serve others) and kill
        what lingers: a job step whose slurmd went first would outlive the test."""
        self.run("scancel", "--me", check=False)
        deadline = time.monotonic() + 30
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        self.run("scontrol", "shutdown", check=False)
        for process in reversed(self.processes):  # slurmd, slurmctld, then slurmdbd and MariaDB
            if process.poll() is None:
                process.terminate()  # slurmdbd and MariaDB; the Slurm daemons are shut down already
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for pid in _steps_of(self.env["SLURM_CONF"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _steps_of(conf: str) -> list[int]:
    """The slurmstepd processes of the cluster configured by ``conf`` (their environment names it)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() == "slurmstepd" and \
                    f"SLURM_CONF={conf}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


GPUS = 2  # the node's gres/gpu count
ONE_AT_A_TIME = "one"  # with accounting: a QOS under which a user may have one job queued or running


def _config(folder: Path, node: str, cpus: int, memory_mb: int, dbd_port: int | None) -> str:
    """slurm.conf. A requeued job is held back until its old credentials expire (a job started
    sooner is killed as "Job credential revoked"): ``cred_expire=5`` makes that hold 6 s instead
    of 121, and the main scheduler, which starts it then, looks every second instead of every 60."""
    storage = (f"accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\nAccountingStoragePort={dbd_port}\n"
               "AccountingStorageEnforce=limits,qos" if dbd_port else "accounting_storage/none")
    return f"""\
ClusterName=hndtest
GresTypes=gpu
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
AccountingStorageType={storage}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=10
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _write_gres(folder: Path, node: str) -> None:
    """gres.conf beside slurm.conf: the node's GPUs as files slurmd finds (it counts the files
    named, and drains a node that reports fewer GPUs than slurm.conf gives it)."""
    for index in range(GPUS):
        (folder / f"gpu{index}").touch()
    (folder / "gres.conf").write_text(f"NodeName={node} Name=gpu File={folder}/gpu[0-{GPUS - 1}]\n")


def _munged_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


def _until(check, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test Slurm: {what} did not come up within {timeout_s:.0f} s")
        time.sleep(0.25)


def _start_accounting(cluster: Cluster, env: dict, db_port: int, dbd_port: int) -> None:
    """MariaDB with a database user for slurmdbd, then slurmdbd, then the cluster registered."""
    folder = cluster.folder
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={folder}/db", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, timeout=120,
                   capture_output=True)
    sock = f"{folder}/db.sock"
    cluster.processes.append(subprocess.Popen(
        [_daemon("mariadbd"), "--no-defaults", f"--datadir={folder}/db", f"--socket={sock}", f"--port={db_port}",
         "--bind-address=127.0.0.1", "--user=root", f"--log-error={folder}/mariadb.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    sql = ["mariadb", "--no-defaults", "-S", sock, "-u", "root"]
    _until(lambda: subprocess.run([*sql, "-e", "select 1"], capture_output=True).returncode == 0, "MariaDB")
    subprocess.run([*sql, "-e", "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
                                "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"], check=True, timeout=30)
    dbd = folder / "slurmdbd.conf"  # slurmdbd reads it beside slurm.conf
    dbd.write_text(f"AuthType=auth/munge\nDbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={dbd_port}\n"
                   f"SlurmUser=root\nLogFile={folder}/slurmdbd.log\nPidFile={folder}/slurmdbd.pid\n"
                   f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={db_port}\n"
                   "StorageUser=slurm\nStoragePass=slurm\nStorageLoc=slurm_acct_db\n")
    dbd.chmod(0o600)
    cluster.processes.append(subprocess.Popen([_daemon("slurmdbd"), "-D"], env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True))
    _until(lambda: cluster.run("sacctmgr", "-n", "list", "cluster", check=False).returncode == 0, "slurmdbd")
    cluster.run("sacctmgr", "-i", "add", "cluster", "hndtest")  # root's association comes with it
    cluster.run("sacctmgr", "-i", "add", "qos", ONE_AT_A_TIME, "MaxSubmitJobsPerUser=1")
    cluster.run("sacctmgr", "-i", "modify", "user", "root", "set", f"qos+={ONE_AT_A_TIME}")


def start(folder: str | Path, *, accounting: bool = False, timeout_s: float = 120.0) -> Cluster:
    """Start the single-node cluster configured in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    conf = folder / "slurm.conf"
    db_port, dbd_port = (_free_port(), _free_port()) if accounting else (None, None)
    conf.write_text(_config(folder, node, cpus, memory_mb, dbd_port))
    _write_gres(folder, node)
    cluster = Cluster(folder, node, {"SLURM_CONF": str(conf)})
    begin = time.monotonic()
    if not _munged_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _daemon("munged")], check=True, timeout=30)
    env = {**os.environ, **cluster.env}
    if accounting:
        _start_accounting(cluster, env, db_port, dbd_port)
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
