#!/usr/bin/env bash
# Regenerate the demo's published table: run `sj-parallel demo` (runs/demo), then copy its table.md
# to docs/results/demo_resnet20_strongest.md and rewrite the README's and benchmarks page's blocks.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m sj_parallel_conversion demo --no-progress --out runs/demo
python tools/publish_demo.py --table runs/demo/table.md
