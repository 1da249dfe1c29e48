"""CPU implementation: fused C++ kernels, built with the host's C++ compiler on first use.

The reference implementation needs about a dozen passes over a block of neurons (one addition
per input step, the count's six operations, a comparison and a multiplication per output step),
each a separate operator call. The kernel in ``csrc/native_fire.cpp`` (package data) does the
same arithmetic in one pass: for a block of neurons it sums the input steps in order, computes
the count and writes the ``T`` output values, so each input value is read once and each output
value written once. It mirrors :mod:`.torch_backend` operation by operation (sequential sum in
the input dtype, IEEE division, no fused multiply-add), so both give identical bits. A second
entry point is the count domain's quantiser (AVX2, used where the CPU has it).

The library is compiled once per source text, flags, compiler and platform (a SHA-256 of them
names it) into a cache folder (``$SJPC_CACHE_DIR``, an absolute path, else
``$XDG_CACHE_HOME/sj_parallel_conversion`` or ``~/.cache/sj_parallel_conversion``), written there
atomically, and loaded with ctypes. Loading a library runs its code, so the cache is private: the
folder is created with mode 0700 whatever the umask, a folder or file that is a symbolic link,
belongs to another user or is writable by group or others is refused, and a library is loaded
only if its SHA-256 matches the one recorded in ``<library>.sha256`` when it was built; a library
that fails the hash or fails to load is rebuilt. The compiler is ``$CXX``, else ``c++``, ``g++``
or ``clang++`` from ``PATH``.

ctypes passes raw pointers, so :func:`launch_fire` and :func:`launch_count` check every tensor
they hand over (device, dtype, layout, sizes, overlap) and raise ``TypeError``/``ValueError``
rather than let the kernel read the wrong memory. The kernels split their work into at most
``torch.get_num_threads()`` parts, run on the calling thread and on worker threads the library
keeps for the life of the process. A C++ exception comes back as a status and a message:
``MemoryError`` for ``std::bad_alloc``, ``ValueError`` for ``std::invalid_argument`` and
``RuntimeError`` for anything else.

Why ctypes rather than a torch C++ extension registered with the dispatcher: an extension
compiles against torch's headers, which need C++20 and must be rebuilt for every torch version
(a ten-line ``at::parallel_for`` operator took 15 s of CPU with g++ 12 and torch 2.14, this
whole file 3 s), and torch's extension cache has none of the protections above.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import formulas
from . import sources, torch_backend

# No -ffast-math and no contraction into fused multiply-adds: every operation rounds as the
# reference's does. No -march: the cached library must run on any machine sharing the cache.
FLAGS = ("-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-pthread")

#: The kernel source in ``kernels/csrc`` (package data).
SOURCE = "native_fire.cpp"

_FUNCTIONS = {torch.float32: "sjpc_native_fire_f32", torch.float64: "sjpc_native_fire_f64"}
DTYPES = tuple(_FUNCTIONS)
_COUNT_FUNCTIONS = {torch.float32: "sjpc_native_count_f32", torch.float64: "sjpc_native_count_f64"}

# Spike counts are exact integers in float32 only up to 2**24 (and the kernel counts steps in int32).
MAX_T = 1 << 24

_PARALLEL_MIN = 1 << 16


def compiler() -> Optional[str]:
    """The C++ compiler command used to build host code: ``$CXX`` (which may hold arguments, as in
    ``"ccache g++"``), else ``c++``, ``g++`` or ``clang++`` from ``PATH``."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


class CacheError(RuntimeError):
    """The kernel cache folder, or a file in it, is not one this process may load code from."""


def cache_dir() -> Path:
    """Folder of built kernel libraries (see the module docstring). ``$SJPC_CACHE_DIR`` must be an
    absolute path (a relative one would change meaning with the working directory): ``CacheError``."""
    env = os.environ.get("SJPC_CACHE_DIR")
    if env:
        if not os.path.isabs(env):
            raise CacheError(f"SJPC_CACHE_DIR must be an absolute path, got {env!r}")
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):  # the XDG rule: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sj_parallel_conversion"


def _refuse_unsafe(st: os.stat_result, what: str, path: Path, kind: str) -> None:
    """Refuse what another user could have written: a link, another owner, group/world-writable."""
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"{what} {str(path)!r} is a symbolic link; refusing to load from it")
    if not (stat.S_ISDIR(st.st_mode) if kind == "folder" else stat.S_ISREG(st.st_mode)):
        raise CacheError(f"{what} {str(path)!r} is not a {'folder' if kind == 'folder' else 'regular file'}")
    if st.st_uid != os.geteuid():
        raise CacheError(f"{what} {str(path)!r} belongs to user id {st.st_uid}, not to this user "
                         f"({os.geteuid()}); refusing to load from it")
    if st.st_mode & 0o022:
        raise CacheError(f"{what} {str(path)!r} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                         "refusing to load from it (chmod go-w it, or set SJPC_CACHE_DIR to a private folder)")


def private_cache_dir() -> Path:
    """:func:`cache_dir`, created with mode 0700 whatever the umask (missing parents too), and
    checked: a real folder of this user that no other user can write. Raises ``CacheError``."""
    folder = cache_dir()
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # another process made it: checked below like any existing folder
        os.chmod(d, 0o700)  # the umask may have taken bits off (or left none for the owner)
    _refuse_unsafe(os.lstat(folder), "kernel cache folder", folder, "folder")
    return folder


def _read_private(path: Path, what: str) -> bytes:
    """The bytes of a file in the cache, opened without following links and checked on the open
    descriptor itself (nothing can be swapped between the check and the read)."""
    _refuse_unsafe(os.lstat(path), what, path, "file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        _refuse_unsafe(os.fstat(fd), what, path, "file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _verified(lib: Path) -> Optional[str]:
    """``None`` when ``lib`` and its hash file are private files and the hash matches, else why not."""
    try:
        recorded = _read_private(_hash_file(lib), "kernel hash file").decode("ascii", "replace").strip()
        digest = hashlib.sha256(_read_private(lib, "kernel library")).hexdigest()
    except FileNotFoundError:
        return "its hash file is missing"
    except (CacheError, OSError) as exc:
        return str(exc)
    return None if recorded == digest else "its SHA-256 differs from the one recorded when it was built"


def _hash_file(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def build_library(name: str, files: dict, main: str, flags: Sequence[str], cxx: Optional[str] = None,
                  rebuild: bool = False) -> Path:
    """Compile ``files`` (file name -> text; ``main`` is the one to compile) into a shared library.

    The library is named after a hash of the sources, flags and compiler and kept in
    :func:`private_cache_dir` with its SHA-256 in ``<library>.sha256``. A cached library is reused
    only when both are private files of this user and the hash matches; otherwise (or with
    ``rebuild=True``) it is built again in a fresh temporary folder and both files are moved in by
    atomic renames, so concurrent processes never load a half-written file. Raises
    ``RuntimeError`` with the compiler's output when the build fails, ``FileNotFoundError`` when
    there is no compiler, ``CacheError`` when the cache folder is not private.
    """
    cxx = cxx or compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler found: set $CXX or install g++ or clang++")
    # The platform is part of the key: a cache folder shared between machines of different
    # architectures must not hand one of them the other's library.
    key = hashlib.sha256("\0".join([*(f"{k}\0{v}" for k, v in sorted(files.items())), main, cxx, *flags,
                                    sys.platform, platform.machine()]).encode()).hexdigest()[:16]
    folder = private_cache_dir()
    lib = folder / f"{name}_{key}.so"
    log = logging.getLogger("sj_parallel_conversion")
    if not rebuild and os.path.lexists(lib):
        problem = _verified(lib)
        if problem is None:
            return lib
        log.info("rebuilding %s: the cached library is not used (%s)", name, problem)
    log.info("building %s with %s (once; cached in %s)", name, cxx, folder)
    build = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=folder))
    try:
        for fname, text in files.items():
            (build / fname).write_text(text)
        tmp = build / "lib.so"
        try:
            res = subprocess.run([*shlex.split(cxx), *flags, "-I", str(build), str(build / main), "-o", str(tmp)],
                                 capture_output=True, text=True, timeout=600)
        except OSError as exc:
            raise RuntimeError(f"could not run the C++ compiler {cxx!r}: {exc}") from None
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {name} (exit {res.returncode}):\n{res.stderr[-4000:]}")
        os.chmod(tmp, 0o700)  # the compiler's file follows the umask, which may let others write it
        digest = build / "lib.sha256"
        with open(digest, "w", encoding="ascii") as f:
            f.write(hashlib.sha256(tmp.read_bytes()).hexdigest() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(digest, 0o600)
        os.replace(tmp, lib)
        os.replace(digest, _hash_file(lib))
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return lib


def load_library(name: str, files: dict, main: str, flags: Sequence[str], cxx: Optional[str] = None) -> ctypes.CDLL:
    """:func:`build_library`, then load it with ctypes; a cached library that fails to load
    (damaged, built for another machine) is rebuilt once before the error is raised."""
    lib = build_library(name, files, main, flags, cxx)
    try:
        return ctypes.CDLL(str(lib))
    except OSError as exc:
        logging.getLogger("sj_parallel_conversion").info("rebuilding %s: the cached library does not load (%s)",
                                                         name, exc)
    return ctypes.CDLL(str(build_library(name, files, main, flags, cxx, rebuild=True)))


def _short(exc: BaseException) -> str:
    """One short line for the fallback warning; the whole text goes to the debug log."""
    text = f"{exc.__class__.__name__}: {exc}"
    logging.getLogger("sj_parallel_conversion").debug("native kernel unavailable: %s", text)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


@functools.lru_cache(maxsize=1)
def _load():
    """``(library, None)`` or ``(None, reason)``; built and loaded once per process."""
    try:
        lib = load_library("sjpc_native_fire", {SOURCE: sources.read(SOURCE)}, SOURCE, FLAGS)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, _short(exc)
    p, i64, i32, buf = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p
    try:
        for fn in _FUNCTIONS.values():
            f = getattr(lib, fn)
            f.argtypes = [p, p, p, p, p, p, i64, i32, i32, i64, i64, i32, i32, buf, i64]
            f.restype = i32
        for fn in _COUNT_FUNCTIONS.values():
            f = getattr(lib, fn)
            f.argtypes = [p, p, p, p, p, p, i64, i32, i64, i64, i32, buf, i64]
            f.restype = i32
        lib.sjpc_native_count_ok.restype = i32
        lib.sjpc_native_workers.restype = i64
        lib.sjpc_native_raise.argtypes = [i32, buf, i64]
        lib.sjpc_native_raise.restype = i32
    except AttributeError as exc:  # a library without the entry points is not this kernel
        return None, _short(exc)
    return lib, None


def availability() -> Optional[str]:
    """``None`` when the native kernel is built and loaded, else the reason it cannot be."""
    return _load()[1]


def _library():
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"the native CPU kernel is unavailable: {reason}")
    return lib


# The kernels' statuses (enum Status in csrc/native_fire.cpp): 0 done, 1 done and a time mean was
# NaN, negative: an error, with its message in the caller's buffer.
_NAN_SEEN, _NOT_BUILT = 1, -4
_ERRORS = {-1: MemoryError, -2: ValueError, -3: RuntimeError}
_MESSAGE_BYTES = 512


_buffers = threading.local()


def _call(fn, *args) -> int:
    """``fn(*args, message buffer, its size)``, with a negative status raised as its exception."""
    err = getattr(_buffers, "err", None)
    if err is None:  # one buffer per thread: calls from several threads may run at once
        err = _buffers.err = ctypes.create_string_buffer(_MESSAGE_BYTES)
    status = fn(*args, err, _MESSAGE_BYTES)
    if status >= 0:
        return status
    if status == _NOT_BUILT:
        raise RuntimeError("the native count kernel is not built for this architecture (x86-64 only)")
    message = err.value.decode("utf-8", "replace") or f"status {status}"
    raise _ERRORS.get(status, RuntimeError)(f"native kernel: {message}")


def workers() -> int:
    """Worker threads the native library has started (they stay until the process exits)."""
    return int(_library().sjpc_native_workers())


# -- the boundary: every tensor handed to the C entry points is checked here ----------------------
def _check_tensor(t, name: str, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"native kernel: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_cpu or t.layout != torch.strided:
        raise ValueError(f"native kernel: {name} must be a strided CPU tensor, got {t.layout} on {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"native kernel: {name} is {t.dtype} but the kernel reads {dtype} here")


def _check_vectors(params: Sequence[torch.Tensor], names: Sequence[str], C: int, dtype: torch.dtype) -> None:
    for p, name in zip(params, names):
        _check_tensor(p, name, dtype)
        if p.dim() != 1 or p.numel() != C or not p.is_contiguous():
            raise ValueError(f"native kernel: {name} must be {C} contiguous values (one per channel), got shape "
                             f"{tuple(p.shape)} with strides {p.stride()}")


# The layout checks below run at every call, so they are plain arithmetic on the sizes and strides.
def _dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` and ``strides`` fills ``prod(shape)`` consecutive elements in
    some axis order (axes of length 1 have no say)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(shape, strides) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_steps(t: torch.Tensor) -> bool:
    """Whether ``t`` ``[T, ...]`` holds its steps one after another, each dense: step ``s``
    occupies ``[s * M, (s + 1) * M)`` from the first element, as the kernels read and write it."""
    shape, strides = t.shape, t.stride()
    if len(shape) < 2:
        return False
    M = math.prod(shape[1:])
    return M == 0 or ((shape[0] == 1 or strides[0] == M) and _dense(shape[1:], strides[1:]))


def _same_layout(a: torch.Tensor, b: torch.Tensor, skip: int) -> bool:
    """Whether ``a`` and ``b`` put every element of their axes from ``skip`` on at the same offset
    (the sizes and the strides of axes longer than 1 agree)."""
    return a.shape[skip:] == b.shape[skip:] and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape[skip:], a.stride()[skip:], b.stride()[skip:]))


def _check_overlap(src: torch.Tensor, dst: torch.Tensor, src_n: int, dst_n: int) -> None:
    """``dst`` either is ``src`` (same first element) or shares no memory with it."""
    a, b = src.data_ptr(), dst.data_ptr()
    if a != b and a < b + dst_n * dst.element_size() and b < a + src_n * src.element_size():
        raise ValueError("native kernel: the output partly overlaps the input (it may be the input itself, "
                         "or separate memory)")


def launch_fire(x: torch.Tensor, out: torch.Tensor, params: Sequence[torch.Tensor], T: int, inner: int, C: int,
                late: bool, threads: int) -> bool:
    """Run the fire kernel on checked buffers; returns whether a neuron's time mean was NaN.

    ``x`` ``[T_in, ...]`` and ``out`` ``[T, ...]`` must hold their steps dense, one after another,
    in one shared layout (``out`` may be ``x`` itself when ``T_in == T``); ``params``
    (``theta_pre, psi, psi_da, spike_value``) are ``C`` contiguous values each in ``x``'s dtype,
    and a neuron at offset ``i`` of a step belongs to channel ``(i // inner) % C``. Anything else
    raises ``TypeError`` or ``ValueError`` before the kernel sees a pointer.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FUNCTIONS:
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"native kernel: x must be a float32 or float64 tensor, got {what}")
    _check_tensor(x, "x", x.dtype)
    _check_tensor(out, "out", x.dtype)
    if not (isinstance(T, int) and 1 <= T <= MAX_T and x.dim() >= 1 and 1 <= x.shape[0] <= MAX_T):
        raise ValueError(f"native kernel: T and T_in must lie in [1, {MAX_T}], got T={T!r}, x of shape "
                         f"{tuple(x.shape)}")
    if not _dense_steps(x):
        raise ValueError(f"native kernel: x must be [T_in, ...] with dense steps in one layout, got shape "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    T_in = x.shape[0]
    if not _dense_steps(out) or out.shape[0] != T or not _same_layout(x, out, 1):
        raise ValueError(f"native kernel: out must be [{T}, {', '.join(map(str, x.shape[1:]))}] with dense steps "
                         f"laid out as x's, got shape {tuple(out.shape)} with strides {out.stride()}")
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"native kernel: threads must be an int >= 1, got {threads!r}")
    _check_vectors(params, ("theta_pre", "psi", "psi_da", "spike_value"), C, x.dtype)
    M = math.prod(x.shape[1:])
    if out.data_ptr() == x.data_ptr() and T != T_in:
        raise ValueError(f"native kernel: writing over the input needs T_in == T, got T_in={T_in}, T={T}")
    _check_overlap(x, out, T_in * M, T * M)
    status = _call(getattr(_library(), _FUNCTIONS[x.dtype]), x.data_ptr(), out.data_ptr(),
                   *[p.data_ptr() for p in params], M, T_in, T, inner, C, 1 if late else 0, threads)
    return status == _NAN_SEEN


def launch_count(m: torch.Tensor, out: torch.Tensor, params: Sequence[torch.Tensor], scale: Optional[torch.Tensor],
                 T: int, inner: int, C: int, threads: int) -> None:
    """Run the count kernel on checked buffers: ``m`` and ``out`` dense with the same layout
    (``out`` may be ``m``), ``params`` (``theta_pre, psi, psi_da``) and ``scale`` (or ``None``)
    ``C`` contiguous values each in ``m``'s dtype."""
    if not isinstance(m, torch.Tensor) or m.dtype not in _COUNT_FUNCTIONS:
        what = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(f"native count kernel: m must be a float32 or float64 tensor, got {what}")
    _check_tensor(m, "m", m.dtype)
    _check_tensor(out, "out", m.dtype)
    if not (isinstance(T, int) and 1 <= T <= MAX_T):
        raise ValueError(f"native count kernel: T must lie in [1, {MAX_T}], got {T!r}")
    if not _dense(m.shape, m.stride()) or not _same_layout(m, out, 0):
        raise ValueError(f"native count kernel: m and out must be dense with one layout, got shapes "
                         f"{tuple(m.shape)}, {tuple(out.shape)} with strides {m.stride()}, {out.stride()}")
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"native count kernel: threads must be an int >= 1, got {threads!r}")
    vectors = list(params) + ([] if scale is None else [scale])
    _check_vectors(vectors, ("theta_pre", "psi", "psi_da", "scale"), C, m.dtype)
    M = m.numel()
    _check_overlap(m, out, M, M)
    _call(getattr(_library(), _COUNT_FUNCTIONS[m.dtype]), m.data_ptr(), out.data_ptr(),
          *[p.data_ptr() for p in params], None if scale is None else scale.data_ptr(), M, T, inner, C, threads)


def _written(t: torch.Tensor) -> None:
    # The kernels write through a raw pointer: bump the version as torch's in-place operations
    # do, so that autograd refuses a tensor it saved instead of reading the overwritten values.
    torch.autograd.graph.increment_version(t)


def _per_channel(step: torch.Tensor, channel_dim: int, params: Sequence[torch.Tensor], who: str):
    """``(params, C, inner)`` for the kernels, which cannot broadcast: each parameter as ``C``
    contiguous values in ``step``'s dtype, and the run length ``inner`` in ``step``'s dense
    layout, in which memory position ``j`` belongs to channel ``(j // inner) % C``."""
    # Each conversion only where needed: this runs at every call, and small layers feel it.
    vectors = []
    for p in params:
        if p.requires_grad:
            p = p.detach()
        if p.dtype != step.dtype or not p.is_cpu:
            p = p.to(device="cpu", dtype=step.dtype)
        vectors.append(p if p.dim() == 1 else p.reshape(-1))
    cd = formulas.check_channels(step.shape, channel_dim, [p.numel() for p in vectors], who)
    C = max(p.numel() for p in vectors)
    # Scalars: one run over all positions.
    inner = step.stride(cd) if cd >= 0 else max(step.numel(), 1)
    return [p if p.numel() == C and p.is_contiguous() else p.expand(C).contiguous() for p in vectors], C, inner


def _threads(work: int) -> int:
    # Below _PARALLEL_MIN values one thread is faster than waking others.
    return torch.get_num_threads() if work >= _PARALLEL_MIN else 1


def fire(x_seq: torch.Tensor, T: int, params: Sequence[torch.Tensor], channel_dim: int, late: bool,
         nan_seen: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
    """Same contract as :func:`.torch_backend.fire` (``params`` is ``(theta_pre, psi, psi_da,
    spike_value)``), for float32 and float64 CPU tensors. ``inplace=True`` writes the spikes
    over ``x_seq`` and returns it; it needs ``T_in == T`` and steps in one dense layout."""
    if x_seq.dtype not in _FUNCTIONS:
        raise TypeError(f"the native kernel supports {[str(d) for d in DTYPES]}, got {x_seq.dtype}")
    if x_seq.device.type != "cpu":
        raise ValueError(f"the native kernel runs on CPU tensors, got one on {x_seq.device}")
    T_in = x_seq.shape[0]
    if not 1 <= T <= MAX_T or not 1 <= T_in <= MAX_T:
        raise ValueError(f"the native kernel supports T and T_in from 1 to {MAX_T}, got T={T}, T_in={T_in}")
    x = x_seq
    dense_steps = _dense_steps(x)
    if inplace and (T_in != T or not dense_steps):
        raise ValueError(f"the native kernel writes in place only into T={T} dense steps of one layout, got "
                         f"shape {tuple(x.shape)} with strides {x.stride()}")
    if not dense_steps:
        # The kernel walks every step in one shared dense layout (the one the output gets too).
        x = torch.empty_strided(x.shape, formulas.step_strides(x[0], T_in), dtype=x.dtype).copy_(x)
    step = x[0]
    params, C, inner = _per_channel(step, channel_dim, params, "the native kernel")
    out = x if inplace else torch.empty_strided((T,) + tuple(step.shape), formulas.step_strides(step, T),
                                                dtype=x.dtype)
    M = step.numel()
    if M == 0:
        return out
    saw_nan = launch_fire(x, out, params, T, inner, C, late, _threads(M * max(T, T_in)))
    if inplace:
        _written(x)
    if saw_nan and nan_seen is not None:
        nan_seen.fill_(1)
    return out


@functools.lru_cache(maxsize=1)
def count_available() -> bool:
    """Whether the native count kernel runs here: built, on an x86-64 CPU with AVX2. Elsewhere
    its scalar form would be slower than torch's vectorised operations, which then run instead."""
    lib, _ = _load()
    return lib is not None and lib.sjpc_native_count_ok() == 1


def dense(x: torch.Tensor) -> bool:
    """Whether ``x`` is dense in some order of its axes (contiguous, channels-last, ...): the
    layouts in which channel ``c`` owns runs of ``x.stride(channel axis)`` positions."""
    return x.dim() >= 1 and _dense(x.shape, x.stride())


def count(m: torch.Tensor, T: int, params: Sequence[torch.Tensor], scale: Optional[torch.Tensor], channel_dim: int,
          inplace: bool = False) -> torch.Tensor:
    """:func:`.formulas.spike_count` (times ``scale`` when given) of a dense float32/float64 CPU
    tensor ``m`` ``[N, ...]`` in one pass, the same bits as the torch operations. ``params`` is
    ``(theta_pre, psi, psi_da)``, each a scalar or per-channel; ``inplace`` writes over ``m``."""
    if not count_available():
        raise RuntimeError("the native count kernel needs an x86-64 CPU with AVX2 and a C++ compiler")
    if m.dtype not in _COUNT_FUNCTIONS or m.device.type != "cpu" or not dense(m):
        raise ValueError(f"the native count needs a dense float32/float64 CPU tensor, got {m.dtype} on "
                         f"{m.device} with shape {tuple(m.shape)} and strides {m.stride()}")
    if not 1 <= T <= MAX_T:
        raise ValueError(f"the native kernel supports T from 1 to {MAX_T}, got T={T}")
    vectors, C, inner = _per_channel(m, channel_dim, (*params, *(() if scale is None else (scale,))),
                                     "the native count")
    out = m if inplace else torch.empty_like(m)
    if m.numel() == 0:
        return out
    launch_count(m, out, vectors[:3], vectors[3] if scale is not None else None, T, inner, C,
                 _threads(m.numel()))
    if inplace:
        _written(m)
    return out
