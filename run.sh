#!/usr/bin/env bash
# Set everything up in ./.venv, then run one job:
#   ./run.sh book [PROFILE]   run the notebooks of a profile (default cpu) and build the book
#                             into _build/html; finished runs are kept and skipped next time
#   ./run.sh explore [ARGS]   the split explorer as a web app on 127.0.0.1 (hnd explore --help)
#   ./run.sh lab [ARGS]       JupyterLab on the notebooks, with this environment's kernel (hnd lab --help)
#   ./run.sh test             run the whole test suite (needs Chromium for the browser check)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${HND_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
    local python="${PYTHON:-python3}" extras="$1"  # the book needs only [book]; the tests every extra
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "run.sh: Python >= 3.10 is needed ($python is $("$python" -V 2>&1))" >&2; exit 2; }
    [ -x "$PY" ] || "$python" -m venv "$VENV"
    # torch and torchvision are pinned together (constraints.txt) so that pip never pairs a
    # local torch wheel with a torchvision built for another torch.
    "$PY" -m pip install --quiet --disable-pip-version-check --no-compile -c constraints.txt -e ".[$extras]" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    # Bytecode for every installed module and for hnd, compiled on all cores (pip compiles on one:
    # the book's install took 100 s that way, 60 s + 22 s this way, on 2 cores); every notebook's
    # kernel imports from it, also where PYTHONDONTWRITEBYTECODE keeps Python from writing it.
    # Once per set of requirements (a stamp in the venv), not at every start. Some packages ship
    # files that do not compile (templates, other Pythons' tests): ignored.
    local stamp="$VENV/.bytecode-$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)-${extras//,/-}"
    if [ ! -e "$stamp" ]; then
        "$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" hnd \
            >/dev/null 2>&1 || true
        touch "$stamp"
    fi
    "$PY" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")'
}

book() {
    local profile="${1:-cpu}" status=0
    "$PY" -m hnd book run --profile "$profile" || status=$?
    [ "$status" -le 1 ] || exit "$status"  # 1: some runs failed; the book still shows the others
    "$PY" -m hnd book build --profile "$profile"
    return "$status"
}

apt_install() {
    # apt_install WHAT PACKAGES...: Debian packages a test runs against, when root can install them.
    local what="$1"; shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run.sh: installing $* for $what"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") \
            >/dev/null 2>&1 || echo "run.sh: could not install $*; $what will fail or skip" >&2
    else
        echo "run.sh: $* not found; install them (apt-get install -y $*) or $what will fail or skip" >&2
    fi
}

test_tools() {
    # The browser test opens the built book in headless Chromium (Debian's `chromium`); the cluster
    # tests start a single-node Slurm (Debian's slurm-wlm and munge) on this machine, once with
    # accounting (slurmdbd on MariaDB).
    command -v "${HND_CHROMIUM:-chromium}" >/dev/null || apt_install "the browser test" chromium
    { command -v slurmctld || [ -x /usr/sbin/slurmctld ]; } >/dev/null || apt_install "the Slurm tests" slurm-wlm munge
    { { command -v slurmdbd || [ -x /usr/sbin/slurmdbd ]; } && { command -v mariadbd || [ -x /usr/sbin/mariadbd ]; }; } \
        >/dev/null || apt_install "the Slurm accounting test" slurmdbd mariadb-server
}

case "${1:-}" in
    book) shift; setup book; book "$@" ;;
    explore) shift; setup book,live; exec "$PY" -m hnd explore "$@" ;;
    lab) shift; setup book,live; exec "$PY" -m hnd lab "$@" ;;
    # One test process per core (at most 8), each with one thread: the suite's models are small.
    test) shift; setup book,live,test,deploy,edge,timm; test_tools; "$PY" -m pytest -q -n auto --maxprocesses 8 --dist worksteal tests "$@" ;;
    *) echo "usage: ./run.sh book [smoke|cpu|paper] | explore | lab | test" >&2; exit 2 ;;
esac
