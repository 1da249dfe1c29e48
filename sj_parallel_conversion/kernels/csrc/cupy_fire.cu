// CUDA kernel of sj_parallel_conversion's parallel conversion neuron, one entry point per dtype:
// for every neuron it sums the T_in input steps, computes the spike count and writes the T output
// values. kernels/cupy_backend.py compiles this file with NVRTC at run time (options in
// NVRTC_OPTIONS: no fused multiply-add, IEEE division, no flush-to-zero), so that it mirrors the
// torch reference (kernels/torch_backend.py) operation by operation and gives the same bits.
// tests/test_cuda_kernel_host.py compiles the same file for the host against stand-ins for the
// CUDA headers and checks it against the reference without a GPU.
//
// Steps are dense with one shared layout and indexed in memory order: neuron i of step t is at
// t * M + i, and its channel is (i / inner) % C. nan_flag, when not null, is set to 1 by any
// neuron whose time mean is NaN and is never cleared.

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
