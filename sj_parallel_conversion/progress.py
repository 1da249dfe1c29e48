"""Progress bars, drawn the way tqdm's own conventions say.

Every bar the package draws comes from :func:`progress`: it is shown only when the caller enables
it, standard error is a terminal (tqdm's ``disable=None``) and the ``TQDM_DISABLE`` environment
variable is unset or false. SpikingJelly's built-in recipes draw bars of their own with no switch;
:func:`quiet_stderr` keeps them off the screen where ours would be off.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "bars_wanted", "quiet_stderr"]

_Item = TypeVar("_Item")


def bars_wanted(enabled: bool = True) -> bool:
    """Whether a bar may be drawn now: ``enabled``, ``TQDM_DISABLE`` unset or false, stderr a terminal."""
    env = os.environ.get("TQDM_DISABLE", "").strip().lower()
    if env not in ("", "0", "false", "no", "off"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(enabled) and bool(isatty and isatty())


def progress(iterable: Iterable[_Item], desc: str, enabled: bool = True, total: Optional[int] = None) -> tqdm:
    """``iterable`` wrapped in a transient tqdm bar labelled ``desc``, drawn only when
    :func:`bars_wanted` says so (a disabled tqdm still iterates and accepts ``set_postfix``).

    ``total`` is the expected number of items, where ``len(iterable)`` does not tell it.
    """
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not bars_wanted(enabled))


@contextlib.contextmanager
def quiet_stderr(enabled: bool) -> Iterator[None]:
    """Hold back what third-party code writes to stderr (its progress bars) unless bars are wanted.

    Warnings raised meanwhile are re-issued afterwards, and if the block fails the held-back text
    is written out before the exception propagates, so no diagnostic is lost.
    """
    if bars_wanted(enabled):
        yield
        return
    buffer = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with contextlib.redirect_stderr(buffer):
                yield
        except BaseException:
            sys.stderr.write(buffer.getvalue())
            raise
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
