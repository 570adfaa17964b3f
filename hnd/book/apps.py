"""The book's live front ends, on this machine only: the split explorer as a web app (Voilà)
and the notebooks in JupyterLab.

Each runs as a child process bound to loopback. This process waits until the port answers,
prints the address, and on Ctrl-C or SIGTERM asks the child to shut down (it stops its
kernels) and exits 0.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hnd.errors import HndError

EXPLORER_NOTEBOOK = Path(__file__).with_name("explorer.ipynb")
TEMPLATES = Path(__file__).with_name("app_data")  # a Jupyter data folder: voila/templates/hnd-explorer
TEMPLATE = "hnd-explorer"  # Voila's lab template, offline
RUNS_ENV = "HND_EXPLORE_RUNS"  # the runs folder the explorer's kernel reads accuracies from
CWD_ENV = "HND_EXPLORE_CWD"  # where hnd explore started: relative profile paths typed in the app mean it
HOST = "127.0.0.1"
START_TIMEOUT = 120.0  # seconds for the server to answer on its port
STOP_TIMEOUT = 30.0  # seconds for it to shut down before it is killed


def _need(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise HndError(f"{what} needs the `{module}` package: install the live extra "
                       f"(pip install -e '.[book,live]'; ./run.sh explore and ./run.sh lab set it up)")


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise HndError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise HndError(f"port {port} on {HOST} is in use; choose another with --port") from None


def explorer_command(port: int, runs: str | os.PathLike | None) -> tuple[list[str], dict]:
    """The Voilà command line and environment that serve the explorer on ``port``."""
    _need("voila", "hnd explore")
    data_path = os.pathsep.join(p for p in (str(TEMPLATES), os.environ.get("JUPYTER_PATH", "")) if p)
    env = {**os.environ, RUNS_ENV: str(Path(runs).resolve()) if runs else "", CWD_ENV: os.getcwd(),
           "JUPYTER_PATH": data_path}
    return [sys.executable, "-m", "voila", str(EXPLORER_NOTEBOOK), "--no-browser", f"--port={port}",
            f"--Voila.ip={HOST}", "--theme=light", f"--template={TEMPLATE}"], env


def lab_command(port: int, notebooks: str | os.PathLike, token: str) -> tuple[list[str], dict]:
    """The JupyterLab command line that serves ``notebooks`` on ``port`` to holders of
    ``token``; kernels run this Python (the project's environment)."""
    _need("jupyterlab", "hnd lab")
    folder = Path(notebooks)
    if not folder.is_dir():
        raise HndError(f"notebook folder {folder} does not exist; run from the project root or give --notebooks")
    return [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}",
            f"--ServerApp.ip={HOST}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={folder.resolve()}",
            f"--IdentityProvider.token={token}"] + (["--allow-root"] if _is_root() else []), dict(os.environ)


def _is_root() -> bool:
    """Containers often run as root, which Jupyter refuses unless told; loopback and the
    token still guard the server."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def serve(name: str, command: list[str], env: dict, port: int, url_path: str = "/", log=print) -> int:
    """Run ``command`` (a server on ``port``) until it exits or this process is asked to stop;
    0 after a requested stop, else the server's exit code."""
    _check_port(port)
    # Its own session: Ctrl-C reaches this process only, which then stops the server cleanly
    # (a Jupyter server would otherwise ask for confirmation on the terminal).
    child = subprocess.Popen(command, env=env, start_new_session=True)
    stopping = []

    def stop(signum, frame) -> None:
        stopping.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while child.poll() is None and not _answers(port) and time.monotonic() < deadline and not stopping:
            time.sleep(0.2)
        if child.poll() is None and not stopping:
            if not _answers(port):
                stop(signal.SIGTERM, None)
                raise HndError(f"{name} did not answer on port {port} within {START_TIMEOUT:.0f} s")
            log(f"{name}: http://{HOST}:{port}{url_path} (Ctrl-C stops it)")
        stop_by = None
        while (code := child.poll()) is None:
            if stopping and stop_by is None:
                stop_by = time.monotonic() + STOP_TIMEOUT
            if stop_by is not None and time.monotonic() > stop_by:
                child.kill()  # it did not shut down in time
            time.sleep(0.2)
        if stopping:
            return 0
        if code:
            raise HndError(f"{name} exited with code {code}; its messages above say why")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.kill()
            child.wait()
