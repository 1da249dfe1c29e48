#!/usr/bin/env bash
# The fast tests: `bash tools/test.sh` (extra arguments go to pytest; `-m "slow or not slow"`
# runs the slow ones too).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q "$@"
