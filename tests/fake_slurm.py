"""A stand-in for Slurm's sbatch, srun, sacct and squeue on one machine, for what the real
single node of ``slurm_cluster.py`` does not produce in a test's time: a job ended by its time
limit (Slurm's shortest is a minute).

``sbatch FILE`` numbers the job, keeps the batch file as ``<state>/<id>.sbatch`` and runs that
copy in the background as a Slurm node would (SLURM_* variables set). Slurm too runs its own
copy: submitit moves FILE right after ``sbatch`` returns, so a job that opened FILE itself could
find it gone (bash's exit 127). ``srun --output PATTERN CMD`` runs CMD with its output appended
to the pattern's file; ``sacct -j ID[,ID]`` reports RUNNING, COMPLETED or FAILED from the job's
process and exit code, or the state a test writes into ``<state>/<id>.state`` (e.g. TIMEOUT).
"""

from __future__ import annotations

import sys
from pathlib import Path

SBATCH = r'''
import os, re, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_STATE"])
state.mkdir(parents=True, exist_ok=True)
counter = state / "counter"
job = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(job))
script = Path(sys.argv[-1]).read_text()
(state / f"{job}.sbatch").write_text(script)
env = dict(os.environ, SLURM_JOB_ID=str(job), SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
           SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_NODELIST="fakenode")
wrapper = f'bash {state}/{job}.sbatch; echo $? > {state}/{job}.rc'  # the copy, as Slurm runs its own
process = subprocess.Popen(["sh", "-c", wrapper], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
(state / f"{job}.pid").write_text(str(process.pid))
print(f"Submitted batch job {job}")
'''

SRUN = r'''
import os, sys
args = sys.argv[1:]
output = None
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag == "--output":
        output = args.pop(0)
if output:
    output = output.replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
os.execvp(args[0], args)
'''

SACCT = r'''
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_STATE"])
jobs = [j for i, a in enumerate(sys.argv) if a == "-j" for j in sys.argv[i + 1].split(",")]
if "-n" not in sys.argv:
    print("JobID|State|NodeList")
for job in jobs:
    forced, rc, pid = (state / f"{job}.{k}" for k in ("state", "rc", "pid"))
    if forced.exists():
        status = forced.read_text().strip()
    elif rc.exists():
        status = "COMPLETED" if rc.read_text().strip() == "0" else "FAILED"
    elif pid.exists():
        status = "RUNNING"
    else:
        continue
    print(f"{job}|{status}" if "-n" in sys.argv else f"{job}|{status}|fakenode")
'''

SQUEUE = r'''
# The stand-in's sacct lists every job it ran, so squeue is asked only whether the controller
# answers: it does, with no job of its own.
'''


def install(folder: Path) -> tuple[Path, Path]:
    """Write the four commands into ``folder/bin``; returns (bin folder, state folder)."""
    bin_dir, state = folder / "bin", folder / "state"
    bin_dir.mkdir(parents=True)
    for name, code in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("squeue", SQUEUE)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return bin_dir, state
