"""Ctrl-C while the command line is still importing torch and SpikingJelly (seconds on a cold
start) ends as Ctrl-C does later: one line on stderr and exit status 130, not a traceback through
the import machinery. Imported first by the package, it acts only when the process is the
``sj-parallel`` command or ``python -m sj_parallel_conversion`` (never for a program importing the
package), and not with ``--debug``, which asks for tracebacks."""
from __future__ import annotations

import os
import sys

MESSAGE = "sj-parallel: interrupted (no output file was written or changed)\n"


def _is_command_line() -> bool:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 in ("sj-parallel", "sj-parallel.exe", "sj-parallel-script.py"):
        return True
    orig = list(getattr(sys, "orig_argv", ()))
    return any(a == "-m" and b in ("sj_parallel_conversion", "sj_parallel_conversion.__main__")
               for a, b in zip(orig, orig[1:]))


def _interrupted(exc_type, exc, tb, previous=sys.excepthook) -> None:
    if not issubclass(exc_type, KeyboardInterrupt) or "--debug" in sys.argv[1:]:
        previous(exc_type, exc, tb)
        return
    try:
        sys.stdout.flush()
        sys.stderr.write(MESSAGE)
        sys.stderr.flush()
    finally:
        os._exit(130)  # the status main() returns for Ctrl-C; nothing was started that needs cleanup


if _is_command_line():
    sys.excepthook = _interrupted
