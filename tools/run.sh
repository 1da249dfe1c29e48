#!/usr/bin/env bash
# The main job: `bash tools/run.sh` runs the demo; `bash tools/run.sh ARGS` passes ARGS to sj-parallel.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "$#" -eq 0 ]; then set -- demo; fi
exec python -m sj_parallel_conversion "$@"
