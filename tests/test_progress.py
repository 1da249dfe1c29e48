"""Progress bars follow tqdm's conventions: off on non-TTY output and with TQDM_DISABLE."""
from __future__ import annotations

import io
import sys
import warnings

import pytest

from sj_parallel_conversion import progress as P


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, tty, enabled, drawn", [
    (None, True, True, True),
    (None, False, True, False),     # piped or redirected output
    (None, True, False, False),     # the caller's switch (--no-progress)
    ("1", True, True, False),
    ("True", True, True, False),
    ("0", True, True, True),
    ("false", True, True, True),
])
def test_bars_drawn_only_when_tqdm_conventions_allow(monkeypatch, env, tty, enabled, drawn):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert P.bars_wanted(enabled) is drawn
    bar = P.progress(range(3), "work", enabled)
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(loss="0.1")  # accepted whether drawn or not
    bar.close()
    assert ("work" in err.getvalue()) is drawn


def test_quiet_stderr_holds_back_output_but_not_failures_or_warnings(monkeypatch):
    err = io.StringIO()  # not a terminal: bars are off
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.warns(UserWarning, match="kept"):
        with P.quiet_stderr(True):
            sys.stderr.write("a third-party bar\n")
            warnings.warn("kept", UserWarning)
    assert err.getvalue() == ""
    with pytest.raises(RuntimeError):
        with P.quiet_stderr(True):
            sys.stderr.write("context before the failure\n")
            raise RuntimeError("boom")
    assert "context before the failure" in err.getvalue()
