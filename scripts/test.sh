#!/usr/bin/env bash
# Run every test: the unit tests (tests/), then every chapter's stored outputs, strictly (pytest --nbval book/).
# Usage (after installing, see README.md):  bash scripts/test.sh
# Uses .venv/bin/python unless VHMN_PYTHON names another interpreter. Data root: $VHMN_DATA, else <repo>/data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${VHMN_PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
    echo "scripts/test.sh: no Python at $PY. Install first (README.md):" >&2
    echo "  python3.11 -m venv .venv && .venv/bin/pip install -r requirements-lock.txt -e ." >&2
    exit 2
fi
# Notebooks run with book/ as their working directory, so hand them an absolute data root.
root="${VHMN_DATA:-data}"
case "$root" in /*) ;; *) root="$PWD/$root" ;; esac
export VHMN_DATA="$root"
# CIFAR-10 is what the chapters read; fetch it once if the data root lacks it (needs internet access).
if [ ! -f "$VHMN_DATA/cifar10/train.npz" ] || [ ! -f "$VHMN_DATA/cifar10/test.npz" ]; then
    "$PY" -m vhmn.data fetch cifar10 --root "$VHMN_DATA"
fi
unset MPLBACKEND  # the notebooks' stored figures come from the inline backend
echo "scripts/test.sh: python $("$PY" -c 'import sys; print(sys.version.split()[0])'), VHMN_DATA=$VHMN_DATA"

# Build matplotlib's font cache now: on a fresh machine the first import says so on stderr,
# which would show up as an extra output in the first notebook.
"$PY" -c "import matplotlib.pyplot" >/dev/null 2>&1

# pytest exits 5 when it collected no test (e.g. no chapter written yet): that is not a failure here.
run_pytest() {
    local rc=0
    "$PY" -m pytest "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "scripts/test.sh: pytest $* collected no tests (exit 5); not a failure"
        return 0
    fi
    return "$rc"
}

run_pytest tests
run_pytest --nbval --nbval-current-env book/
