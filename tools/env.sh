# Sourced by tools/run.sh and tools/test.sh: create .venv at the repository root if it is missing,
# install the package with its pinned dependencies, and activate it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.sjpc-installed"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating $VENV" >&2
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/constraints.txt" -nt "$STAMP" ] || [ "$ROOT/setup.cfg" -nt "$STAMP" ]; then
    echo "[env] installing sj-parallel-conversion and pinned dependencies (first run: a few minutes)" >&2
    # The pinned torch wheel is its CUDA build: the environment takes about 6 GiB. Say so up front,
    # since a full disk otherwise shows only as pip's "No space left on device" halfway through.
    free_mib() { df -Pm "$ROOT" | awk 'NR == 2 {print $4}'; }
    free_now=$(free_mib || true)
    if [ -n "$free_now" ] && [ "$free_now" -lt 7168 ]; then
        echo "[env] warning: ${free_now} MiB free on the disk of $ROOT; the environment needs about 6 GiB" >&2
    fi
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[cupy,dev]"; then
        echo "[env] installing into $VENV failed ($(free_mib) MiB free now); fix the cause, then rerun (the install resumes)" >&2
        exit 1
    fi
    touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export SJPC_CIFAR10_DIR="${SJPC_CIFAR10_DIR:-$ROOT/../shared/data/cifar10}"
# The public pretrained CIFAR-10 ResNet-32/44 that tests/test_pretrained_resnets.py evaluates.
export SJPC_PRETRAINED_DIR="${SJPC_PRETRAINED_DIR:-$ROOT/../shared/data/pretrained_cifar10_resnets}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
cd "$ROOT"
