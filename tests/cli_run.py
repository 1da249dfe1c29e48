"""Running the ``sj-parallel`` command line inside a test process, for the CLI test files."""
from __future__ import annotations

from typing import Sequence, Tuple

from sj_parallel_conversion.tools import cli


def run_cli(argv: Sequence, capsys) -> Tuple[int, str, str]:
    """``cli.main(argv)`` (arguments as strings): its exit status, standard output and standard error."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli_line(argv: Sequence, capsys) -> Tuple[int, str, str]:
    """:func:`run_cli`, where standard error must be at most one line and no traceback: that line
    (empty when nothing was written) in place of the whole text."""
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) <= 1, err
    return code, out, lines[0] if lines else ""
