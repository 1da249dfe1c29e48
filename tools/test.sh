#!/usr/bin/env bash
# The test suite: `bash tools/test.sh` (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q "$@"
