// neuron_edit, CUDA kernel + extern "C" launcher. Math and shapes: emokernels/ops/neuron_edit.py.
//
//   out[b,t,:] = a[b,t,:]                                                  (bit-exact copy)
//   out[b,t,index[j]] = a[b,t,index[j]] * scale[row_idx[b], j]
//                       + strength[b] * add[row_idx[b], j]      for j < n, where pos_mask[b,t]
//
// a/out: [B,T,N] contiguous device memory (dtype code of emk_common.h); index: int64 [n]
// (distinct); scale/add: fp32 [E,n] or 0 (= absent: scale 1 / add 0); row_idx: int64 [B];
// strength: fp32 [B]; pos_mask: bool (1 byte) [B,T]. fp32 arithmetic, one round-to-nearest-even
// to the storage type.
//
// out != a: one cudaMemcpyAsync (device to device) of a into out, then the sparse kernel on the
// same stream. out == a: in place; only the B*T*n selected elements are read and written.
// One thread per (row, j): the selected channels are scattered, so there is nothing to coalesce
// beyond consecutive j of one row; the tables (E*n floats) stay in L1/L2.
// The multiply and the add are two IEEE roundings (__fmul_rn/__fadd_rn, no FMA contraction)
// so fp32 results match torch eager and the CPU kernel bit for bit.
//
// No host synchronisation, so arguments in device memory are not validated on the host. Device
// side: an index[j] outside [0, N) is skipped (never written out of bounds), and a row_idx[b]
// outside [0, E) writes NaN into the selected channels of that row so the error is loud. The
// Python wrapper validates both where that is free (CPU) and documents the contract.
// No torch headers.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../include/emk_common.h"

namespace emk_ne {

template <typename T> __device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename T> __device__ __forceinline__ void st(T* p, int64_t i, float v);
template <> __device__ __forceinline__ void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void st<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

template <typename T, bool HAS_SCALE, bool HAS_ADD>
__global__ void neuron_edit_kernel(T* __restrict__ out, const T* a, const int64_t* __restrict__ index,
                                   const float* __restrict__ scale, const float* __restrict__ add,
                                   const int64_t* __restrict__ row_idx,
                                   const float* __restrict__ strength,
                                   const uint8_t* __restrict__ mask, int64_t T_, int64_t N,
                                   int64_t n, int64_t E, int64_t total) {
    // a and out may alias (in place): no __restrict__ on them.
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / n;
        if (!mask[r]) continue;
        const int64_t j = i - r * n;
        const int64_t c = index[j];
        if (c < 0 || c >= N) continue;
        const int64_t b = r / T_;
        const int64_t e = row_idx[b];
        const int64_t off = r * N + c;
        float x;
        if (e < 0 || e >= E) {
            x = __int_as_float(0x7fc00000);  // bad row id: NaN, loudly
        } else {
            x = ld(a, off);
            if (HAS_SCALE) x = __fmul_rn(x, scale[e * n + j]);
            if (HAS_ADD) x = __fadd_rn(x, __fmul_rn(strength[b], add[e * n + j]));
        }
        st(out, off, x);
    }
}

template <typename T>
cudaError_t launch(T* out, const T* a, const int64_t* index, const float* scale, const float* add,
                   const int64_t* row_idx, const float* strength, const uint8_t* mask, int64_t B,
                   int64_t T_, int64_t N, int64_t n, int64_t E, cudaStream_t stream) {
    const int64_t total = B * T_ * n;
    if (total == 0 || (!scale && !add)) return cudaSuccess;
    const int threads = 256;
    int64_t blocks = (total + threads - 1) / threads;
    if (blocks > 65535LL * 32) blocks = 65535LL * 32;  // grid-stride loop covers the rest
#define EMK_NE_LAUNCH(S, A)                                                                  \
    neuron_edit_kernel<T, S, A><<<(unsigned)blocks, threads, 0, stream>>>(                   \
        out, a, index, scale, add, row_idx, strength, mask, T_, N, n, E, total)
    if (scale && add) EMK_NE_LAUNCH(true, true);
    else if (scale) EMK_NE_LAUNCH(true, false);
    else EMK_NE_LAUNCH(false, true);
#undef EMK_NE_LAUNCH
    return cudaGetLastError();
}

}  // namespace emk_ne

// Returns EMK_OK (0), EMK_BAD_DTYPE / EMK_BAD_ARG (< 0), or a positive cudaError_t.
extern "C" int emk_neuron_edit_cuda(uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale,
                                    uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                                    uintptr_t pos_mask, int64_t B, int64_t T, int64_t N, int64_t n,
                                    int64_t E, int dtype, uintptr_t stream) {
    if (B < 0 || T < 0 || N < 0 || n < 0 || n > N) return EMK_BAD_ARG;
    size_t elem;
    switch (dtype) {
        case EMK_F32: elem = 4; break;
        case EMK_F16: case EMK_BF16: elem = 2; break;
        default: return EMK_BAD_DTYPE;
    }
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (out != a && B * T * N > 0) {
        cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(a),
                                          elem * static_cast<size_t>(B * T * N),
                                          cudaMemcpyDeviceToDevice, s);
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    const int64_t* idx = reinterpret_cast<const int64_t*>(index);
    const float* sc = reinterpret_cast<const float*>(scale);
    const float* ad = reinterpret_cast<const float*>(add);
    const int64_t* ridx = reinterpret_cast<const int64_t*>(row_idx);
    const float* stg = reinterpret_cast<const float*>(strength);
    const uint8_t* m = reinterpret_cast<const uint8_t*>(pos_mask);
    cudaError_t err;
    switch (dtype) {
        case EMK_F32:
            err = emk_ne::launch<float>(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(a),
                                        idx, sc, ad, ridx, stg, m, B, T, N, n, E, s);
            break;
        case EMK_F16:
            err = emk_ne::launch<__half>(reinterpret_cast<__half*>(out), reinterpret_cast<const __half*>(a),
                                         idx, sc, ad, ridx, stg, m, B, T, N, n, E, s);
            break;
        default:
            err = emk_ne::launch<__nv_bfloat16>(reinterpret_cast<__nv_bfloat16*>(out),
                                                reinterpret_cast<const __nv_bfloat16*>(a),
                                                idx, sc, ad, ridx, stg, m, B, T, N, n, E, s);
            break;
    }
    return static_cast<int>(err);
}
