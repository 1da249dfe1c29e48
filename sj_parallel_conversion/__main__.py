"""``python -m sj_parallel_conversion`` runs the ``sj-parallel`` command line."""
import sys

from .tools.cli import main

sys.exit(main())
