#!/usr/bin/env bash
# The first GPU run, from the repository root of a fresh GPU machine:
#     bash tools/gpu_check.sh [OUT [ARGS...]]
# creates the README's environment (tools/env.sh: .venv with the pinned dependencies and cupy),
# then runs benchmarks/gpu_check.py: the CUDA tests, the cupy kernel against the torch backend bit
# for bit, the node against SpikingJelly's IFNode and the shipped ResNet-20 against SpikingJelly's
# IF-SNN, written to OUT/gpu_check.json and OUT/gpu_check.md (default OUT: runs/gpu_check).
# ARGS go to the script (--skip-tests, --timeout S; --cpu-dry-run runs it all, tiny, on a CPU).
# Exit status: 0 when every check passed, 1 when one failed, 2 without a CUDA device.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${1:-runs/gpu_check}"
if [ "$#" -gt 0 ]; then shift; fi
exec python benchmarks/gpu_check.py --out "$OUT" "$@"
