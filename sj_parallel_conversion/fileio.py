"""Reading and writing files: no unpickling of code, no file ever half-written.

* :func:`load_tensor_file` reads a PyTorch file with ``torch.load(weights_only=True)``: tensors
  and plain containers only, so a crafted file cannot run code. Missing, empty, corrupt files,
  directories and files that would need pickle are refused with one line naming the file.
* :func:`atomic_path` / :func:`save_tensors` / :func:`write_text` / :func:`write_json` /
  :func:`save_figure` write to a temporary file in the target's folder, flush it to disk and
  rename it over the target, so an interrupted or failing write (disk full, Ctrl-C) leaves the
  previous file as it was and no partial file behind.
* :func:`check_output_path` checks an output path before any work: not empty, not a directory
  and not ending in a path separator, its folder exists and a file can be created there (tried,
  not guessed from permission bits, which root and read-only mounts make misleading), and it is
  not one of the inputs.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Union

import torch

__all__ = ["FileError", "load_tensor_file", "check_output_path", "atomic_path", "save_tensors",
           "write_text", "write_json", "save_figure", "save_plot", "load_state"]

PathLike = Union[str, "os.PathLike[str]"]

STATE_DICT_HINT = "save tensors and plain containers instead, e.g. torch.save(model.state_dict(), path)"


class FileError(ValueError):
    """A file that cannot be read or written as asked; the message names the file."""


# -- reading ---------------------------------------------------------------------------------------
def load_tensor_file(path: PathLike, what: str = "file", map_location: Any = "cpu",
                     instead: str = STATE_DICT_HINT) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming ``what`` and the file.

    Raises :class:`FileNotFoundError` for a missing file and :class:`FileError` for a directory,
    an empty, unreadable or corrupt file, and a file holding Python objects that only pickle could
    rebuild (refused because unpickling can run arbitrary code; ``instead`` says what to save).
    """
    p = os.fspath(path)
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{what} {p!r} does not exist")
    if os.path.isdir(p):
        raise FileError(f"{what} {p!r} is a directory, not a file")
    try:
        size = os.path.getsize(p)
    except OSError as exc:
        raise FileError(f"{what} {p!r} cannot be read: {exc.strerror or exc}") from None
    if size == 0:
        raise FileError(f"{what} {p!r} is empty")
    caught: list = []
    try:
        # torch warns about some files before it refuses them (a raw pickle's protocol): the
        # refusal below says all there is to say, so its warnings are shown only for a file it reads.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            blob = torch.load(p, map_location=map_location, weights_only=True)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return blob
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            # The weights-only unpickler names the first class or function the file refers to.
            raise FileError(f"{what} {p!r} holds Python objects that only pickle can load ({found.group(1)}); refused "
                            f"because unpickling can run arbitrary code: {instead}") from None
        raise FileError(f"{what} {p!r} is not a PyTorch file or is corrupt (cannot unpickle)") from None
    except PermissionError as exc:
        raise FileError(f"{what} {p!r} cannot be read: {exc.strerror or exc}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            AttributeError, TypeError) as exc:
        # torch.load reports truncated archives, garbage bytes and legacy-format damage through
        # many exception types; the user needs to know only that the file is unreadable.
        # The first sentence of torch's reason (a cut mid-word helps nobody; "101" alone is
        # the unpickler's invalid load key, which says the bytes are not a pickle).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(". ")[0].rstrip(".")[:200]
        if first.isdigit():
            first = f"not a zip archive or pickle: invalid load key {first}"
        raise FileError(f"{what} {p!r} is not a PyTorch file or is corrupt/truncated ({first})") from None


# -- checking outputs ------------------------------------------------------------------------------
def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(path: PathLike, inputs: Iterable[Optional[PathLike]] = (), what: str = "output") -> str:
    """Check, before any work, that ``path`` can be written: it is not empty, not a directory and
    does not end in a separator, its folder exists and a file can be created in it, and it is not
    the same file as any of ``inputs`` (``None`` entries are ignored). Returns the path as a
    string; raises :class:`FileError` naming ``what``."""
    p = os.fspath(path)
    if not p:
        raise FileError(f"{what}: empty path; give a file name")
    if os.path.isdir(p):
        raise FileError(f"{what} {p!r} is a directory; give a file name")
    if p.endswith(os.sep) or (os.altsep and p.endswith(os.altsep)):
        raise FileError(f"{what} {p!r} ends with a path separator; give a file name")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise FileError(f"{what} {p!r}: folder {parent!r} does not exist")
    try:
        # What the atomic write will do first: create a temporary file next to the target.
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FileError(f"{what} {p!r}: cannot create files in folder {parent!r} ({exc.strerror or exc})") from None
    for inp in inputs:
        if inp is not None and _same_file(p, os.fspath(inp)):
            raise FileError(f"{what} {p!r} is the same file as the input {os.fspath(inp)!r}; "
                            "writing it would destroy the input")
    return p


# -- writing ---------------------------------------------------------------------------------------
def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block succeeds, flush it to disk and
    rename it over ``path``. On any error (``KeyboardInterrupt`` included) the temporary file is
    removed and ``path`` keeps its previous content; an ``OSError`` (disk full, ...) is raised
    again as :class:`FileError` naming ``path``."""
    p = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(p))
    base = os.path.basename(p)
    # Keep the extension last so writers that choose a format by extension (matplotlib) agree.
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{os.path.splitext(base)[1]}", dir=parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        mode = os.stat(p).st_mode & 0o777 if os.path.exists(p) else _new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, quota, file-size limit: say which file
            raise FileError(f"cannot write {p!r} (previous content kept): {exc.strerror or exc}") from exc
        raise
    # The rename itself is durable only once the folder entry is on disk (POSIX).
    with contextlib.suppress(OSError):
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_tensors(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def write_json(path: PathLike, obj: Any, indent: int = 2, **dumps_kwargs: Any) -> None:
    """Write ``obj`` as JSON (``json.dumps(obj, indent=indent, **dumps_kwargs)``) to ``path``
    through :func:`atomic_path`."""
    write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def save_figure(fig: Any, path: PathLike, **kwargs: Any) -> None:
    """``fig.savefig(path)`` through :func:`atomic_path` (format from ``path``'s extension, else PNG)."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=ext or "png", **kwargs)


def save_plot(fig: Any, path: PathLike, dpi: int = 120, tight: bool = True) -> None:
    """Lay out a matplotlib figure tightly (unless ``tight=False``: laid out already),
    :func:`save_figure` it and close it, also when saving fails (an open figure would keep its
    memory for the rest of the process)."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    try:
        save_figure(fig, path, dpi=dpi)
    finally:
        plt.close(fig)


def _show(items) -> str:
    return f"{items[:6]}{f' and {len(items) - 6} more' if len(items) > 6 else ''}"


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, target: str = "the model") -> None:
    """``model.load_state_dict(state, strict=True)``, which alone decides whether ``state`` fits.

    Raises ``ValueError`` naming ``source`` (the file) and ``target`` (the model): for integer
    tensors where the model holds
    floating-point ones (torch would convert them silently), and when torch refuses the state,
    with the missing and unexpected keys it found, the shape mismatches and any other reason it
    gave (a parameter value a module refuses, say).
    """
    own = model.state_dict()
    integer = [f"{k} ({state[k].dtype})" for k, v in own.items()
               if torch.is_tensor(v) and v.is_floating_point() and torch.is_tensor(state.get(k))
               and not (state[k].is_floating_point() or state[k].is_complex())]
    if integer:
        raise ValueError(f"{source} holds integer tensors where {target} has floating-point weights: "
                         f"{_show(integer)}; refused rather than converted")
    found: Dict[str, list] = {}

    def record(module, keys):
        if module is model:
            found.update(missing=list(keys.missing_keys), unexpected=list(keys.unexpected_keys))

    hook = model.register_load_state_dict_post_hook(record)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
                 if torch.is_tensor(v) and torch.is_tensor(state.get(k)) and state[k].shape != v.shape]
        # torch's own lines, except those the lists above say more briefly.
        other = [line.strip() for line in str(exc).splitlines()[1:] if line.strip() and not line.strip().startswith(
            ("Missing key(s)", "Unexpected key(s)", "size mismatch for"))]
        parts = [f"{label} {_show(items)}" for label, items in
                 (("missing keys", found.get("missing", [])), ("unexpected keys", found.get("unexpected", [])),
                  ("shape mismatches", wrong)) if items] + other
        raise ValueError(f"{source} does not fit {target}: {'; '.join(parts) or ' '.join(str(exc).split())}"
                         ) from None
    finally:
        hook.remove()
