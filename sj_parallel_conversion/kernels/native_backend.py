"""CPU backend: a fused C++ kernel, built with the host's C++ compiler on first use.

The torch backend needs about a dozen passes over a block of neurons (one addition per input
step, the count's six operations, a comparison and a multiplication per output step), each a
separate operator call. This kernel does the same arithmetic in one pass: for a block of
neurons it sums the input steps in order, computes the count and writes the ``T`` output values,
so each input value is read once and each output value written once. It mirrors
:mod:`.torch_backend` operation by operation (sequential sum in the input dtype, IEEE
division, no fused multiply-add), so both backends give identical bits.

The library is compiled once per source version and compiler into a cache folder
(``$SJPC_CACHE_DIR``, an absolute path, else ``$XDG_CACHE_HOME/sj_parallel_conversion`` or
``~/.cache/sj_parallel_conversion``), written there atomically, and loaded with ctypes. Loading a
library runs its code, so the cache is private: the folder is created with mode 0700 whatever the
umask, a folder or file that is a symbolic link, belongs to another user or is writable by group
or others is refused, and a library is loaded only if its SHA-256 matches the one recorded in
``<library>.sha256`` when it was built; a library that fails the hash or fails to load is rebuilt.
Where the kernel cannot be had, ``backend="auto"`` falls back to the torch operations with one
short warning saying why. The compiler is ``$CXX``, else ``c++``, ``g++`` or ``clang++`` from
``PATH``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import formulas
from . import torch_backend

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

// Neurons per block: the block's running sums, counts and spike values stay in cache while its
// T_in input rows are read and its T output rows written; rows of a few KiB keep the hardware
// prefetchers streaming.
constexpr int64_t kBlock = 4096;

// Outputs at least this large are written with non-temporal stores: they cannot stay in cache
// anyway, and bypassing it saves reading every output line before it is overwritten.
constexpr int64_t kStreamBytes = int64_t(1) << 24;

// floor() for values the count formula can produce; written out so that the compiler can
// vectorise it on any x86-64 or ARM target. Exact: values of magnitude >= 2^(mantissa bits)
// are integers already, NaN and infinities pass through.
inline float sjpc_floor(float v) {
    if (!(std::fabs(v) < 8388608.0f)) return v;
    float t = (float)(int32_t)v;
    return t > v ? t - 1.0f : t;
}
inline double sjpc_floor(double v) {
    if (!(std::fabs(v) < 4503599627370496.0)) return v;
    double t = (double)(int64_t)v;
    return t > v ? t - 1.0 : t;
}

// Writes output row t for the n neurons of a block with non-temporal stores, from the first
// 16-byte aligned neuron on; returns where it stopped (the caller writes the rest). The values
// are those of the plain loop: on[i] where the neuron fires, off[i] elsewhere; off == nullptr
// means +0 everywhere (spike values that are finite and positive), which saves a load and two
// operations per vector.
#if defined(__SSE2__)
template <typename F>
inline int64_t write_streamed(F* ot, const int32_t* edge, const F* on, const F* off, int64_t n, int t, int late) {
    // Works on the values' bits (integer SSE2 operations), so one body serves float and double;
    // only the lanes per vector and the widening of the int32 firing masks differ.
    constexpr int64_t lanes = 16 / sizeof(F);
    const auto bits = [](const F* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
    int64_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(ot + i) & 15); ++i)
        ot[i] = (late ? t >= edge[i] : t < edge[i]) ? on[i] : (off ? off[i] : (F)0);
    const __m128i tv = _mm_set1_epi32(late ? t + 1 : t);
    for (; i + lanes <= n; i += lanes) {
        __m128i e, fire;
        if constexpr (sizeof(F) == 4) {
            e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(edge + i));
        } else {
            e = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(edge + i));
        }
        fire = late ? _mm_cmpgt_epi32(tv, e) : _mm_cmpgt_epi32(e, tv);  // t >= e / t < e, all-ones lanes
        if constexpr (sizeof(F) == 8) fire = _mm_unpacklo_epi32(fire, fire);  // each mask to 64 bits
        __m128i v = _mm_and_si128(fire, bits(on + i));
        if (off) v = _mm_or_si128(v, _mm_andnot_si128(fire, bits(off + i)));
        _mm_stream_si128(reinterpret_cast<__m128i*>(ot + i), v);
    }
    return i;
}
#else
template <typename F>
inline int64_t write_streamed(F*, const int32_t*, const F*, const F*, int64_t, int, int) { return 0; }
#endif

template <typename F>
// x and out may be the same array (a neuron overwriting its input): a block's inputs are all
// read before its outputs are written, and threads own disjoint blocks, so no restrict on them.
void fire_range(const F* x, F* out, const F* __restrict__ theta,
                const F* __restrict__ psi, const F* __restrict__ psi_da, const F* __restrict__ value,
                int64_t M, int T_in, int T, int64_t inner, int64_t C, int late, bool plain_zero,
                int64_t begin, int64_t end, int* nan_seen) {
    // On the heap: a block's buffers are too large for the stack of every thread that may call in.
    std::vector<F> acc(kBlock), on(kBlock), off(kBlock);
    std::vector<int32_t> edge(kBlock);
    const F tf = (F)T, tin = (F)T_in, zero = (F)0;
    const bool stream = (int64_t)T * M * (int64_t)sizeof(F) >= kStreamBytes;
    for (int64_t s = begin; s < end; s += kBlock) {
        const int64_t n = std::min(kBlock, end - s);
        const F* x0 = x + s;
        F* a = acc.data();
        for (int64_t i = 0; i < n; ++i) a[i] = x0[i];
        for (int t = 1; t < T_in; ++t) {
            const F* xt = x + (int64_t)t * M + s;
            for (int64_t i = 0; i < n; ++i) a[i] += xt[i];
        }
        // Channel of memory position s: positions advance the channel every `inner` elements.
        int64_t c = (s / inner) % C, r = s % inner;
        for (int64_t i = 0; i < n; ++i) {
            const F m = a[i] / tin;
            if (m != m) *nan_seen = 1;
            F k = sjpc_floor(((m + psi_da[c]) * tf + psi[c]) / theta[c]);
            k = k < zero ? zero : (k > tf ? tf : k);
            const int32_t ki = (k == k) ? (int32_t)k : 0;  // NaN: no spike
            edge[i] = late ? T - ki : ki;                    // late fires at t >= edge, early at t < edge
            on[i] = value[c];
            off[i] = zero * value[c];  // the torch backend multiplies 0/1 by the spike value
            if (++r == inner) { r = 0; if (++c == C) c = 0; }
        }
        for (int t = 0; t < T; ++t) {
            F* ot = out + (int64_t)t * M + s;
            const int32_t* ed = edge.data();
            const F* hi = on.data();
            const F* lo = off.data();
            int64_t i = stream ? write_streamed(ot, ed, hi, plain_zero ? nullptr : lo, n, t, late) : 0;
            if (late) {
                for (; i < n; ++i) ot[i] = t >= ed[i] ? hi[i] : lo[i];
            } else {
                for (; i < n; ++i) ot[i] = t < ed[i] ? hi[i] : lo[i];
            }
        }
    }
#if defined(__SSE2__)
    if (stream) _mm_sfence();  // streamed stores become visible before the thread is joined
#endif
}

// Calls body(part, begin, end) for the positions [0, M) cut into at most `threads` ranges of
// whole blocks, part 0 on this thread and the others on their own; a thread that cannot be
// started (resource limits) has its range run here instead. Returns the number of parts.
template <typename Body>
int64_t split(int64_t M, int threads, const Body& body) {
    const int64_t blocks = (M + kBlock - 1) / kBlock;
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
    const int64_t per = (blocks + n - 1) / n * kBlock;
    std::vector<std::thread> pool;
    for (int64_t j = 1; j < n; ++j) {
        const int64_t b = std::min(M, j * per), e = std::min(M, (j + 1) * per);
        try {
            pool.emplace_back(body, j, b, e);
        } catch (...) {
            body(j, b, e);
        }
    }
    body(0, 0, std::min(M, per));
    for (auto& th : pool) th.join();
    return n;
}

template <typename F>
int fire(const F* x, F* out, const F* theta, const F* psi, const F* psi_da, const F* value,
         int64_t M, int T_in, int T, int64_t inner, int64_t C, int late, int threads) {
    bool plain_zero = true;  // 0 * value is +0 for every channel (finite, non-negative spike values)
    for (int64_t c = 0; c < C; ++c) {
        const F o = (F)0 * value[c];
        plain_zero = plain_zero && o == (F)0 && !std::signbit(o);
    }
    std::vector<int> nan_seen(std::max(threads, 1), 0);
    split(M, threads, [&](int64_t part, int64_t b, int64_t e) {
        fire_range<F>(x, out, theta, psi, psi_da, value, M, T_in, T, inner, C, late, plain_zero, b, e,
                      &nan_seen[part]);
    });
    return *std::max_element(nan_seen.begin(), nan_seen.end());
}

// ---- The count domain's quantiser ---------------------------------------------------------------
// k = clip(floor(((m + psi_da) * T + psi) / theta), 0, T), times scale when given, in one pass over
// memory (x may be out). About a dozen operations per value: bound by instructions rather than
// memory, so it needs wide vectors to beat torch's separate (AVX-512) passes. It is built for
// AVX2 on x86-64 and used only where the CPU runs AVX2 (sjpc_native_count_ok); elsewhere the
// torch operations run. Lane width changes no value: each operation is IEEE-exact per lane.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SJPC_COUNT_AVX2 1
#include <immintrin.h>

// Vec<F>: the AVX2 operations of one dtype (S: the intrinsics' ps / pd suffix).
template <typename F> struct Vec;
#define SJPC_AVX2 __attribute__((target("avx2")))
#define SJPC_VEC(F, R, N, S)                                                                           \
    template <> struct Vec<F> {                                                                         \
        using V = R;                                                                                    \
        static constexpr int lanes = N;                                                                 \
        SJPC_AVX2 static V load(const F* p) { return _mm256_loadu_##S(p); }                             \
        SJPC_AVX2 static V set1(F v) { return _mm256_set1_##S(v); }                                     \
        SJPC_AVX2 static void store(F* p, V v) { _mm256_storeu_##S(p, v); }                             \
        SJPC_AVX2 static V mul(V a, V b) { return _mm256_mul_##S(a, b); }                               \
        /* clamp(floor(...), 0, T): hi where k > 0, else NaN kept and anything else +0 */              \
        SJPC_AVX2 static V quant(V v, V pd, V ps, V th, V tf) {                                         \
            const V k = _mm256_floor_##S(_mm256_div_##S(                                                \
                _mm256_add_##S(_mm256_mul_##S(_mm256_add_##S(v, pd), tf), ps), th));                    \
            const V hi = _mm256_min_##S(k, tf);                                                         \
            const V lo = _mm256_and_##S(_mm256_cmp_##S(k, k, _CMP_UNORD_Q), k);                         \
            return _mm256_blendv_##S(lo, hi, _mm256_cmp_##S(k, _mm256_setzero_##S(), _CMP_GT_OQ));     \
        }                                                                                               \
    };
SJPC_VEC(float, __m256, 8, ps)
SJPC_VEC(double, __m256d, 4, pd)

// One value, the same operations (the tails of the vector loops).
template <typename F>
inline F quant_one(F v, F pd, F ps, F th, F tf) {
    const F k = std::floor(((v + pd) * tf + ps) / th);
    return k > (F)0 ? (k < tf ? k : tf) : (k != k ? k : (F)0);
}

// n values sharing one channel's parameters (per == false) or each with its own (per == true).
template <typename F>
SJPC_AVX2 void count_run(const F* x, F* out, int64_t n, const F* th, const F* ps,
                                               const F* pd, const F* sc, bool per, F tf) {
    using W = Vec<F>;
    const auto vt = W::set1(tf);
    int64_t i = 0;
    if (per) {
        for (; i + W::lanes <= n; i += W::lanes) {
            auto r = W::quant(W::load(x + i), W::load(pd + i), W::load(ps + i), W::load(th + i), vt);
            W::store(out + i, sc ? W::mul(r, W::load(sc + i)) : r);
        }
    } else {
        const auto vpd = W::set1(pd[0]), vps = W::set1(ps[0]), vth = W::set1(th[0]);
        const auto vsc = W::set1(sc ? sc[0] : (F)1);
        for (; i + W::lanes <= n; i += W::lanes) {
            auto r = W::quant(W::load(x + i), vpd, vps, vth, vt);
            W::store(out + i, sc ? W::mul(r, vsc) : r);
        }
    }
    for (; i < n; ++i) {
        const int64_t c = per ? i : 0;
        const F r = quant_one(x[i], pd[c], ps[c], th[c], tf);
        out[i] = sc ? r * sc[c] : r;
    }
}

// Positions [begin, end): channel (j / inner) % C; inner == 1 means channels fastest.
template <typename F>
void count_range(const F* x, F* out, const F* th, const F* ps, const F* pd, const F* sc, int T, int64_t inner,
                 int64_t C, int64_t begin, int64_t end) {
    const F tf = (F)T;
    for (int64_t j = begin; j < end;) {
        const int64_t c = (j / inner) % C;
        const bool per = inner == 1 && C > 1;
        const int64_t stop = std::min(end, per ? j - c + C : (j / inner + 1) * inner);
        count_run<F>(x + j, out + j, stop - j, th + c, ps + c, pd + c, sc ? sc + c : nullptr, per, tf);
        j = stop;
    }
}

template <typename F>
int count(const F* x, F* out, const F* th, const F* ps, const F* pd, const F* sc, int64_t M, int T, int64_t inner,
          int64_t C, int threads) {
    split(M, threads, [&](int64_t, int64_t b, int64_t e) {
        count_range<F>(x, out, th, ps, pd, sc, T, inner, C, b, e);
    });
    return 0;
}
#endif

}  // namespace

// An exception must not cross into C (it would abort the interpreter): -1 instead.
template <typename Fn>
int guarded(const Fn& fn) {
    try {
        return fn();
    } catch (...) {
        return -1;
    }
}

// The C entry points, one per dtype; the count returns -2 where it was not built (not x86-64).
#ifdef SJPC_COUNT_AVX2
#define SJPC_COUNT_BODY(F) return guarded([&] { return count<F>(x, out, th, ps, pd, sc, M, T, inner, C, threads); });
#else
#define SJPC_COUNT_BODY(F) return -2;
#endif
#define SJPC_ENTRIES(SUFFIX, F)                                                                           \
    int sjpc_native_fire_##SUFFIX(const F* x, F* out, const F* theta, const F* psi, const F* psi_da,     \
                                  const F* value, int64_t M, int T_in, int T, int64_t inner, int64_t C,   \
                                  int late, int threads) {                                               \
        return guarded([&] { return fire<F>(x, out, theta, psi, psi_da, value, M, T_in, T, inner, C, late, threads); }); \
    }                                                                                                    \
    int sjpc_native_count_##SUFFIX(const F* x, F* out, const F* th, const F* ps, const F* pd, const F* sc, \
                                   int64_t M, int T, int64_t inner, int64_t C, int threads) {             \
        SJPC_COUNT_BODY(F)                                                                               \
    }

extern "C" {
int sjpc_native_count_ok() {
#ifdef SJPC_COUNT_AVX2
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}
SJPC_ENTRIES(f32, float)
SJPC_ENTRIES(f64, double)
}
"""

# No -ffast-math and no contraction into fused multiply-adds: every operation rounds as the
# torch backend's does. No -march: the cached library must run on any machine sharing the cache.
FLAGS = ("-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-pthread")

_FUNCTIONS = {torch.float32: "sjpc_native_fire_f32", torch.float64: "sjpc_native_fire_f64"}
DTYPES = tuple(_FUNCTIONS)
_COUNT_FUNCTIONS = {torch.float32: "sjpc_native_count_f32", torch.float64: "sjpc_native_count_f64"}

# Spike counts are exact integers in float32 only up to 2**24 (and the kernel counts steps in int32).
MAX_T = 1 << 24

# Below this many output values one thread is faster than starting others.
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
        lib = load_library("sjpc_native_fire", {"fire.cpp": _SOURCE}, "fire.cpp", FLAGS)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, _short(exc)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    try:
        for fn in _FUNCTIONS.values():
            f = getattr(lib, fn)
            f.argtypes = [p, p, p, p, p, p, i64, i32, i32, i64, i64, i32, i32]
            f.restype = i32
        for fn in _COUNT_FUNCTIONS.values():
            f = getattr(lib, fn)
            f.argtypes = [p, p, p, p, p, p, i64, i32, i64, i64, i32]
            f.restype = i32
        lib.sjpc_native_count_ok.restype = i32
    except AttributeError as exc:  # a library without the entry points is not this kernel
        return None, _short(exc)
    return lib, None


def availability() -> Optional[str]:
    """``None`` when the native kernel is built and loaded, else the reason it cannot be."""
    return _load()[1]


def _written(t: torch.Tensor) -> None:
    # The kernels write through a raw pointer: bump the version as torch's in-place operations
    # do, so that autograd refuses a tensor it saved instead of reading the overwritten values.
    torch.autograd.graph.increment_version(t)


def _per_channel(step: torch.Tensor, channel_dim: int, params: Sequence[torch.Tensor], who: str):
    """``(params, C, inner)`` for the kernels, which cannot broadcast: each parameter as ``C``
    contiguous values in ``step``'s dtype, and the run length ``inner`` in ``step``'s dense
    layout, in which memory position ``j`` belongs to channel ``(j // inner) % C``."""
    params = [p.detach().to(device="cpu", dtype=step.dtype).reshape(-1) for p in params]
    cd = formulas.check_channels(step.shape, channel_dim, [p.numel() for p in params], who)
    C = max(p.numel() for p in params)
    # Scalars: one run over all positions.
    inner = step.stride(cd) if cd >= 0 else step.numel()
    return [p.expand(C).contiguous() for p in params], C, inner


def fire(x_seq: torch.Tensor, T: int, params: Sequence[torch.Tensor], channel_dim: int, order: str,
         check_nan: bool = False, inplace: bool = False) -> torch.Tensor:
    """Same contract as :func:`.torch_backend.fire` (``params`` is ``(theta_pre, psi, psi_da,
    spike_value)``), for float32 and float64 CPU tensors. ``inplace=True`` writes the spikes
    over ``x_seq`` and returns it; it needs ``T_in == T`` and steps in one dense layout."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"backend='native' is unavailable: {reason}")
    if x_seq.dtype not in _FUNCTIONS:
        raise TypeError(f"the native backend supports {[str(d) for d in DTYPES]}, got {x_seq.dtype}")
    if x_seq.device.type != "cpu":
        raise ValueError(f"the native backend runs on CPU tensors, got one on {x_seq.device}")
    T_in = x_seq.shape[0]
    if not 1 <= T <= MAX_T or not 1 <= T_in <= MAX_T:
        raise ValueError(f"the native backend supports T and T_in from 1 to {MAX_T}, got T={T}, T_in={T_in}")
    x = x_seq
    if inplace and (T_in != T or torch_backend.flat_steps(x) is None):
        raise ValueError(f"the native kernel writes in place only into T={T} dense steps of one layout, got "
                         f"shape {tuple(x.shape)} with strides {x.stride()}")
    if torch_backend.flat_steps(x) is None:
        # The kernel walks every step in one shared dense layout (the one the output gets too).
        x = torch.empty_strided(x.shape, formulas.step_strides(x[0], T_in), dtype=x.dtype).copy_(x)
    step = x[0]
    M = step.numel()
    params, C, inner = _per_channel(step, channel_dim, params, "the native kernel")
    out = x if inplace else torch.empty_strided((T,) + tuple(step.shape), formulas.step_strides(step, T),
                                                dtype=x.dtype)
    if M == 0:
        return out
    threads = torch.get_num_threads() if M * max(T, T_in) >= _PARALLEL_MIN else 1
    nan_seen = getattr(lib, _FUNCTIONS[x.dtype])(
        x.data_ptr(), out.data_ptr(), *[p.data_ptr() for p in params], M, T_in, T, inner, C,
        1 if order == "late" else 0, threads)
    if nan_seen < 0:
        raise MemoryError("the native kernel could not allocate its block buffers")
    if inplace:
        _written(x)
    if check_nan and nan_seen:
        from . import NaNMeanError

        raise NaNMeanError("NaN time-mean current")
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
    return x.dim() >= 1 and x.stride() == formulas.step_strides(x, 1)[1:]


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
        raise ValueError(f"the native backend supports T from 1 to {MAX_T}, got T={T}")
    params, C, inner = _per_channel(m, channel_dim, (*params, *(() if scale is None else (scale,))),
                                    "the native count")
    out = m if inplace else torch.empty_like(m)
    M = m.numel()
    if M == 0:
        return out
    threads = torch.get_num_threads() if M >= _PARALLEL_MIN else 1
    sc = params[3].data_ptr() if scale is not None else None
    status = getattr(_load()[0], _COUNT_FUNCTIONS[m.dtype])(m.data_ptr(), out.data_ptr(), params[0].data_ptr(),
                                                           params[1].data_ptr(), params[2].data_ptr(), sc, M, T,
                                                           inner, C, threads)
    if status < 0:
        raise MemoryError("the native count kernel failed (out of memory)")
    if inplace:
        _written(m)
    return out
