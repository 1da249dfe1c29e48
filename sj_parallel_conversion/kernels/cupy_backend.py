"""CUDA backend: one fused cupy kernel per dtype that sums the input steps of a neuron, computes
its spike count and writes its T output values.

The kernel mirrors :mod:`.torch_backend` operation by operation (sequential float32/float64 sum,
IEEE division, no fused multiply-add) so that both backends give identical bits.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .. import formulas
from .torch_backend import accumulation_dtype

_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float sjpc_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ double sjpc_load(const double* p, long long i) { return p[i]; }
__device__ __forceinline__ float sjpc_load(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float sjpc_load(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }

__device__ __forceinline__ void sjpc_cast(float v, float* o) { *o = v; }
__device__ __forceinline__ void sjpc_cast(double v, double* o) { *o = v; }
__device__ __forceinline__ void sjpc_cast(float v, __half* o) { *o = __float2half_rn(v); }
__device__ __forceinline__ void sjpc_cast(float v, __nv_bfloat16* o) { *o = __float2bfloat16_rn(v); }

template <typename IO, typename ACC>
__device__ void sjpc_fire(const IO* __restrict__ x, IO* __restrict__ out,
                          const ACC* __restrict__ theta, const ACC* __restrict__ psi,
                          const ACC* __restrict__ psi_da, const ACC* __restrict__ spike_value,
                          long long M, int T_in, int T, long long inner, int C, int late,
                          int* __restrict__ nan_flag) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < M;
         i += (long long)blockDim.x * gridDim.x) {
        int c = (C == 1) ? 0 : (int)((i / inner) % C);
        ACC acc = sjpc_load(x, i);
        for (int t = 1; t < T_in; ++t) acc += sjpc_load(x, (long long)t * M + i);
        ACC m = acc / (ACC)T_in;
        if (nan_flag != nullptr && m != m) *nan_flag = 1;
        ACC u = (m + psi_da[c]) * (ACC)T + psi[c];
        ACC k = floor(u / theta[c]);
        k = k < (ACC)0 ? (ACC)0 : (k > (ACC)T ? (ACC)T : k);
        int ki = (k == k) ? (int)k : 0;
        IO v, zero;
        sjpc_cast(spike_value[c], &v);
        sjpc_cast((ACC)0, &zero);
        int first = late ? (T - ki) : 0;
        int last = late ? T : ki;
        for (int t = 0; t < T; ++t) out[(long long)t * M + i] = (t >= first && t < last) ? v : zero;
    }
}

extern "C" {
__global__ void sjpc_fire_f32(const float* x, float* o, const float* a, const float* b, const float* c,
                              const float* d, long long M, int Ti, int T, long long inner, int C, int late, int* nf)
{ sjpc_fire<float, float>(x, o, a, b, c, d, M, Ti, T, inner, C, late, nf); }
__global__ void sjpc_fire_f64(const double* x, double* o, const double* a, const double* b, const double* c,
                              const double* d, long long M, int Ti, int T, long long inner, int C, int late, int* nf)
{ sjpc_fire<double, double>(x, o, a, b, c, d, M, Ti, T, inner, C, late, nf); }
__global__ void sjpc_fire_f16(const __half* x, __half* o, const float* a, const float* b, const float* c,
                              const float* d, long long M, int Ti, int T, long long inner, int C, int late, int* nf)
{ sjpc_fire<__half, float>(x, o, a, b, c, d, M, Ti, T, inner, C, late, nf); }
__global__ void sjpc_fire_bf16(const __nv_bfloat16* x, __nv_bfloat16* o, const float* a, const float* b,
                               const float* c, const float* d, long long M, int Ti, int T, long long inner,
                               int C, int late, int* nf)
{ sjpc_fire<__nv_bfloat16, float>(x, o, a, b, c, d, M, Ti, T, inner, C, late, nf); }
}
"""

_KERNEL_NAMES = {
    torch.float32: "sjpc_fire_f32",
    torch.float64: "sjpc_fire_f64",
    torch.float16: "sjpc_fire_f16",
    torch.bfloat16: "sjpc_fire_bf16",
}


@functools.lru_cache(maxsize=1)
def availability() -> Optional[str]:
    """``None`` when cupy can run kernels here, else the reason it cannot."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return f"cupy is not importable ({exc.__class__.__name__}: {exc})"
    try:
        if not cupy.cuda.is_available():
            return "cupy imports but finds no CUDA device"
    except Exception as exc:
        return f"cupy cannot query CUDA ({exc})"
    return None


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=_SOURCE, options=("--std=c++14", "--fmad=false"))
        return module.get_function(name)


def fire(x_seq: torch.Tensor, T: int, params: Sequence[torch.Tensor], channel_dim: int, order: str,
         check_nan: bool = False) -> torch.Tensor:
    """Same contract as :func:`.torch_backend.fire` (``params`` is ``(theta_pre, psi, psi_da,
    spike_value)``), for CUDA tensors."""
    import cupy

    if x_seq.dtype not in _KERNEL_NAMES:
        raise TypeError(f"cupy backend supports {sorted(map(str, _KERNEL_NAMES))}, got {x_seq.dtype}")
    x = x_seq.contiguous()
    T_in = x.shape[0]
    step_shape = x.shape[1:]
    M = 1
    for s in step_shape:
        M *= s
    acc = accumulation_dtype(x.dtype)
    params = [p.to(device=x.device, dtype=acc).reshape(-1).contiguous()
              for p in params]
    C = max(p.numel() for p in params)
    cd = formulas.check_channels(step_shape, channel_dim, [p.numel() for p in params], "the cupy kernel")
    inner = 1
    if C > 1:
        params = [p.expand(C).contiguous() if p.numel() == 1 else p for p in params]
        for s in step_shape[cd + 1:]:
            inner *= s
    out = torch.empty((T,) + tuple(step_shape), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    kernel = _kernel(_KERNEL_NAMES[x.dtype], x.device.index or 0)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device) if check_nan else None
    threads = 256
    blocks = min((M + threads - 1) // threads, 65535 * 8)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream)
    with cupy.cuda.Device(x.device.index or 0):
        kernel(
            (blocks,), (threads,),
            (x.data_ptr(), out.data_ptr(), *[p.data_ptr() for p in params],
             cupy.int64(M), cupy.int32(T_in), cupy.int32(T), cupy.int64(inner), cupy.int32(C),
             cupy.int32(1 if order == "late" else 0), flag.data_ptr() if flag is not None else 0),
            stream=stream,
        )
    if flag is not None and int(flag.item()):
        from . import NaNMeanError

        raise NaNMeanError("NaN time-mean current")
    strides = formulas.step_strides(x_seq[0], T)
    if out.stride() != strides and out.numel() > 0:
        # The kernel indexes the contiguous layout; give the output the input's step layout (for
        # example channels-last), as the torch backend and the operator's fake implementation do.
        out = torch.empty_strided(out.shape, strides, dtype=out.dtype, device=out.device).copy_(out)
    return out
