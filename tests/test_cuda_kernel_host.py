"""The cupy backend's CUDA kernel, compiled for the host, agrees bit for bit with the torch backend.

No GPU is needed: the kernel source that :mod:`sj_parallel_conversion.kernels.cupy_backend`
hands to cupy (``kernels/csrc/cupy_fire.cu``, read as package data) is compiled unchanged with the host C++ compiler against a small shim that stands
in for the CUDA headers (``__global__``/``__device__`` as plain functions, ``blockIdx``/
``threadIdx`` as globals that a host loop sets for every (block, thread) pair in turn, so the
kernel's grid-stride loop runs exactly as launched, and ``__half``/``__nv_bfloat16`` with
round-to-nearest-even conversions written out here). The library is loaded with ctypes and fed
the arguments ``cupy_backend.fire`` passes. Contraction into fused multiply-adds is disabled, as
the kernel is compiled with ``--fmad=false`` on the device.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from sj_parallel_conversion import formulas
from sj_parallel_conversion.kernels import cupy_backend, native_backend, torch_backend
from sj_parallel_conversion.kernels.cupy_backend import _KERNEL_NAMES

SHIM = r"""
#pragma once
// Host stand-ins for what the kernel source takes from CUDA.
#include <cmath>
#include <cstdint>
#include <cstring>
using std::floor;

#define __global__
#define __device__
#define __forceinline__ inline

struct sjpc_dim3 { unsigned x, y, z; };
// One host thread plays every CUDA thread in turn; the launcher sets these before each call.
static sjpc_dim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

static inline float sjpc_bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t sjpc_float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float __half2float(__half h) {
    uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
    if (e == 0x1fu) return sjpc_bits_to_float(sign | 0x7f800000u | (m << 13));        // inf, NaN
    if (e != 0) return sjpc_bits_to_float(sign | ((e + 112u) << 23) | (m << 13));     // normal
    if (m == 0) return sjpc_bits_to_float(sign);                                       // +-0
    uint32_t fe = 113;                                                                 // subnormal
    while (!(m & 0x400u)) { m <<= 1; --fe; }
    return sjpc_bits_to_float(sign | (fe << 23) | ((m & 0x3ffu) << 13));
}

static inline __half __float2half_rn(float f) {
    uint32_t x = sjpc_float_to_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    uint32_t h;
    if (ax > 0x7f800000u) h = 0x7e00u;                      // NaN: CUDA's canonical half NaN
    else if (ax >= 0x477ff000u) h = sign | 0x7c00u;         // >= 65520 rounds to infinity
    else if (ax >= 0x38800000u) {                           // normal half (>= 2^-14)
        uint32_t v = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu), rem = ax & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;   // a carry moves into the exponent
        h = sign | v;
    } else if (ax >= 0x33000000u) {                         // subnormal half (2^-25 .. 2^-14)
        uint32_t shift = 126u - (ax >> 23), m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t v = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (v & 1u))) ++v;
        h = sign | v;
    } else h = sign;                                        // below half the smallest subnormal
    return __half{uint16_t(h)};
}

static inline float __bfloat162float(__nv_bfloat16 b) { return sjpc_bits_to_float(uint32_t(b.bits) << 16); }

static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x = sjpc_float_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};   // NaN, as CUDA returns it
    x += 0x7fffu + ((x >> 16) & 1u);                                        // round to nearest even
    return __nv_bfloat16{uint16_t(x >> 16)};
}
"""

LAUNCHER_HEAD = r"""
#include "kernel.cu"

// sjpc_host<&kernel>::run(grid, block, args...) runs the kernel for every block and thread.
template <auto K> struct sjpc_host;
template <typename... A, void (*K)(A...)> struct sjpc_host<K> {
    static void run(unsigned grid, unsigned block, A... args) {
        gridDim = {grid, 1, 1};
        blockDim = {block, 1, 1};
        for (unsigned b = 0; b < grid; ++b)
            for (unsigned t = 0; t < block; ++t) {
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                K(args...);
            }
    }
};

extern "C" {
void sjpc_f2h(const float* x, uint16_t* o, long long n) { for (long long i = 0; i < n; ++i) o[i] = __float2half_rn(x[i]).bits; }
void sjpc_h2f(const uint16_t* x, float* o, long long n) { for (long long i = 0; i < n; ++i) o[i] = __half2float(__half{x[i]}); }
void sjpc_f2bf(const float* x, uint16_t* o, long long n) { for (long long i = 0; i < n; ++i) o[i] = __float2bfloat16_rn(x[i]).bits; }
"""


def _launcher_source() -> str:
    lines = [LAUNCHER_HEAD]
    for name in sorted(set(_KERNEL_NAMES.values())):
        lines.append(f"auto host_{name} = &sjpc_host<&{name}>::run;")
    lines.append("}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def host_kernel():
    """The kernel library, built once per source version (the native backend's build cache)."""
    if native_backend.compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) on this machine to build the kernel for the host")
    flags = ["-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
    files = {"cuda_fp16.h": SHIM, "cuda_bf16.h": '#include "cuda_fp16.h"\n', "kernel.cu": cupy_backend.source(),
             "launch.cpp": _launcher_source()}
    return ctypes.CDLL(str(native_backend.build_library("sjpc_host_cuda_kernel", files, "launch.cpp", flags)))


def _fire_host(lib, x, T, theta, psi, psi_da, spike_value, channel_dim, late, grid=3, block=4):
    """Run the host-built kernel with the arguments cupy_backend.fire launches it with (the same
    :func:`cupy_backend.prepare`, so layouts and channel strides are the device's)."""
    a = cupy_backend.prepare(x, T, (theta, psi, psi_da, spike_value), channel_dim)
    out = a.out.fill_(7.0)  # 7: never a value the kernel writes
    flag = torch.zeros(1, dtype=torch.int32)
    p = ctypes.c_void_p
    fn_type = ctypes.CFUNCTYPE(None, ctypes.c_uint, ctypes.c_uint, p, p, p, p, p, p, ctypes.c_longlong,
                               ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, p)
    fn = fn_type(ctypes.c_void_p.in_dll(lib, f"host_{_KERNEL_NAMES[x.dtype]}").value)
    fn(grid, block, a.x.data_ptr(), out.data_ptr(), *[q.data_ptr() for q in a.params], a.M, a.T_in, a.T, a.inner,
       a.C, 1 if late else 0, flag.data_ptr())
    return out, bool(flag.item())


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    same = a.view(_BITS[a.dtype]) == b.view(_BITS[b.dtype])
    if not bool(same.all()):
        i = int((~same).flatten().nonzero()[0])
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} values differ; first at flat index {i}: "
                             f"kernel {a.flatten()[i].item()!r} vs torch {b.flatten()[i].item()!r}")


def _channel_of(shape, channel_dim, C):
    """Channel index of every neuron of a step of shape ``shape`` (flattened)."""
    if C == 1:
        return torch.zeros(shape.numel(), dtype=torch.long)
    cd = channel_dim % len(shape)
    inner = shape[cd + 1:].numel()
    return torch.arange(shape.numel()) // inner % C


def _currents(shape, T_in, T, th, psi, psi_da, chan, gen, dtype):
    """Step currents ``[T_in, *shape]``: time means on and a few ulps either side of every firing
    boundary ``((j*theta - psi)/T - psi_da)`` (where rounding decides the count), spread from
    below 0 to above theta, plus NaN and +-inf (alone and cancelling to a NaN mean)."""
    n = shape.numel()
    f64 = lambda p: p.to(torch.float64).reshape(-1)[chan if p.numel() > 1 else torch.zeros_like(chan)]
    theta, shift, bias = f64(th), f64(psi), f64(psi_da)
    x = (torch.rand((T_in, n), generator=gen, dtype=torch.float64) * 4 - 1) * theta
    # Half of the neurons: a constant train at a boundary of level j = 0..T+1, moved by -3..3 ulps.
    idx = torch.arange(0, n, 2)
    j = (idx // 2) % (T + 2)
    target = ((j * theta[idx] - shift[idx]) / T - bias[idx]).to(dtype)
    steps = (idx // (2 * (T + 2))) % 7 - 3
    for _ in range(3):
        up = torch.nextafter(target, torch.full_like(target, float("inf")))
        down = torch.nextafter(target, torch.full_like(target, float("-inf")))
        target = torch.where(steps > 0, up, torch.where(steps < 0, down, target))
        steps = steps - steps.sign()
    x = x.to(dtype)
    x[:, idx] = target.expand(T_in, -1)
    x[0, -1], x[0, -3], x[0, -5] = float("nan"), float("inf"), float("-inf")
    if T_in > 1:
        x[0, -7], x[1, -7] = float("inf"), float("-inf")
    return x.reshape((T_in,) + tuple(shape))


CASES = [
    # (dtype, T_in, T, step shape, channel_dim, per-channel parameters)
    (torch.float32, 4, 4, (6, 5, 3, 3), 1, False),
    (torch.float32, 3, 5, (6, 5, 3, 3), 1, True),
    (torch.float32, 1, 1, (40, 7), -1, True),
    (torch.float32, 8, 1, (4, 3, 5), 1, True),
    (torch.float64, 2, 7, (5, 4, 6), -1, True),
    (torch.float64, 1, 16, (50,), 0, False),
    (torch.float16, 4, 8, (6, 5, 3, 3), 1, True),
    (torch.float16, 3, 2, (30, 9), 1, False),
    (torch.bfloat16, 4, 8, (6, 5, 3, 3), 1, True),
    (torch.bfloat16, 5, 3, (7, 11), -1, True),
]


@pytest.mark.parametrize("late", [True, False], ids=["late", "early"])
@pytest.mark.parametrize("dtype, T_in, T, shape, channel_dim, per_channel", CASES,
                         ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None)
def test_host_kernel_matches_torch_backend_bit_for_bit(host_kernel, dtype, T_in, T, shape, channel_dim,
                                                       per_channel, late):
    gen = torch.Generator().manual_seed(T_in * 100 + T)
    shape = torch.Size(shape)
    acc = torch_backend.accumulation_dtype(dtype)
    C = shape[channel_dim] if per_channel else 1
    # Thresholds with long mantissas, so that dividing and multiplying by a reciprocal differ.
    th = (torch.rand(C, generator=gen, dtype=torch.float64) * 2 + 0.3).to(acc)
    th[0] = 1.1
    psi = 0.5 * th
    psi_da = (torch.rand(C, generator=gen, dtype=torch.float64) * 0.2 - 0.1).to(acc)
    if per_channel:
        # Spike values that half/bfloat16 must round: ties to even, subnormal halves, values past
        # the half range, plus ordinary ones.
        sv = (torch.rand(C, generator=gen, dtype=torch.float64) * 3 + 0.01).to(acc)
        special = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 6e-6, 3e-8,
                                65519.0, 70000.0, 1e39 if acc == torch.float64 else 3e38], dtype=acc)
        sv[: min(C, len(special))] = special[: min(C, len(special))]
    else:
        th, psi, psi_da, sv = th.reshape(()), psi.reshape(()), psi_da.reshape(()), torch.tensor(1 + 2 ** -11, dtype=acc)
    x = _currents(shape, T_in, T, th, psi, psi_da, _channel_of(shape, channel_dim, C), gen, dtype)
    got, flag = _fire_host(host_kernel, x, T, th, psi, psi_da, sv, channel_dim, late)
    want = torch_backend.fire(x, T, (th, psi, psi_da, sv), channel_dim, late)
    _assert_same_bits(got, want)
    # The kernel raises its NaN flag exactly when a time mean is NaN (torch's check_nan).
    assert flag == bool(torch.isnan(torch_backend.time_mean(x)).any())
    # Not a vacuous match: both silent and saturated neurons occur, and partial counts too.
    counts = (got != 0).sum(0)
    assert int(counts.min()) == 0 and int(counts.max()) == T
    if T > 1:
        assert bool(((counts > 0) & (counts < T)).any())


@pytest.mark.parametrize("grid, block", [(1, 1), (2, 3), (64, 32)])
def test_grid_stride_loop_covers_every_neuron_for_any_launch(host_kernel, grid, block):
    """Fewer, as many or more CUDA threads than neurons: every output is written exactly once."""
    x = torch.linspace(-1, 3, 2 * 37).reshape(2, 37)
    args = (4, torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(2.0), 1, True)
    got, _ = _fire_host(host_kernel, x, *args, grid=grid, block=block)
    _assert_same_bits(got, torch_backend.fire(x, args[0], args[1:5], *args[5:]))


def test_half_and_bfloat16_conversions_match_torch(host_kernel):
    """The shim's conversions: every half value to float, and float to half/bfloat16 with
    round-to-nearest-even on ties, subnormals, overflow and signed zeros."""
    halves = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    got = torch.empty(halves.numel(), dtype=torch.float32)
    host_kernel.sjpc_h2f(ctypes.c_void_p(halves.data_ptr()), ctypes.c_void_p(got.data_ptr()),
                         ctypes.c_longlong(halves.numel()))
    want = halves.view(torch.float16).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    _assert_same_bits(got[~nan], want[~nan])

    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2 ** 31, 2 ** 31, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    floats = torch.cat([bits.view(torch.float32),
                        torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2 ** -24, 2 ** -25, 2 ** -25 * 1.0001,
                                      3 * 2 ** -26, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8,
                                      float("inf"), float("-inf"), 3.4e38])])
    floats = floats[~torch.isnan(floats)]  # NaN payloads differ between CUDA and torch; spikes are never NaN
    for fn, dtype in (("sjpc_f2h", torch.float16), ("sjpc_f2bf", torch.bfloat16)):
        out = torch.empty(floats.numel(), dtype=torch.int16)
        getattr(host_kernel, fn)(ctypes.c_void_p(floats.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                 ctypes.c_longlong(floats.numel()))
        _assert_same_bits(out.view(dtype), floats.to(dtype))


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` ``[T_in, N, C, H, W]`` with the same values in another memory layout."""
    if layout == "channels_last":  # every step channels-last, the steps dense one after another
        return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    if layout == "sliced":  # every other element of a wider tensor: no step is dense
        return torch.stack([x, x], dim=-1).flatten(-2)[..., ::2]
    if layout == "time_inner":  # dense, but the time axis innermost
        return x.movedim(0, -1).contiguous().movedim(-1, 0)
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "time_inner"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_kernel_matches_torch_backend_in_every_layout(host_kernel, layout, dtype):
    """Channels-last steps are read and written where they are (the kernel finds a neuron's
    channel from the channel axis's memory stride); other layouts are copied in once; the
    output always has the input steps' layout, as the torch backend gives it."""
    gen = torch.Generator().manual_seed(11)
    T_in, T, shape, C = 3, 5, torch.Size((4, 6, 3, 5)), 6
    acc = torch_backend.accumulation_dtype(dtype)
    th = (torch.rand(C, generator=gen, dtype=torch.float64) * 2 + 0.3).to(acc)
    psi, psi_da = 0.5 * th, (torch.rand(C, generator=gen, dtype=torch.float64) * 0.2 - 0.1).to(acc)
    sv = (torch.rand(C, generator=gen, dtype=torch.float64) * 3 + 0.01).to(acc)
    x = _layout(_currents(shape, T_in, T, th, psi, psi_da, _channel_of(shape, 1, C), gen, dtype), layout)
    a = cupy_backend.prepare(x, T, (th, psi, psi_da, sv), 1)
    assert (a.x.data_ptr() == x.data_ptr()) == (layout == "channels_last")  # copied only where not dense
    assert a.inner == (1 if layout == "channels_last" else shape[2:].numel())
    got, _ = _fire_host(host_kernel, x, T, th, psi, psi_da, sv, 1, True)
    want = torch_backend.fire(x, T, (th, psi, psi_da, sv), 1, True)
    assert got.stride() == want.stride() == formulas.step_strides(x[0], T)
    _assert_same_bits(got, want)
    counts = (got != 0).sum(0)
    assert int(counts.min()) == 0 and int(counts.max()) == T
