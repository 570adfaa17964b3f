#!/usr/bin/env bash
# Set everything up in ./.venv, then run one job:
#   ./run.sh book   build the book (default CPU profile) into _build/html
#   ./run.sh test   run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${HND_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
    local python="${PYTHON:-python3}"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "run.sh: Python >= 3.10 is needed ($python is $("$python" -V 2>&1))" >&2; exit 2; }
    [ -x "$PY" ] || "$python" -m venv "$VENV"
    # torch and torchvision are pinned together (constraints.txt) so that pip never pairs a
    # local torch wheel with a torchvision built for another torch.
    "$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[book,test]" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    "$PY" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")'
}

book() {
    mkdir -p _executed/notebooks
    for nb in notebooks/*.ipynb; do
        "$PY" -m papermill "$nb" "_executed/$nb" -k python3 --cwd notebooks --no-progress-bar
    done
    "$VENV/bin/jupyter-book" build . -W -n --keep-going
    echo "book: open _build/html/index.html"
}

case "${1:-}" in
    book) setup; book ;;
    test) shift; setup; "$PY" -m pytest -q tests "$@" ;;
    *) echo "usage: ./run.sh book | test" >&2; exit 2 ;;
esac
