// gather_add, CUDA kernel + extern "C" launcher (torch-free). Math and shapes:
// emokernels/ops/gather_add.py.
//
//   out[b,t,:] = h[b,t,:] + pos_mask[b,t] * strength[b] * r[b,t] * table[row_idx[b], :]
//   r[b,t]     = sqrt(mean_i h[b,t,i]^2 + eps)   (fp32, on the input h)   if rms_scale else 1
//
// One thread block per (b, t) row. Masked-out rows are copied bit-exactly. out may equal h
// (in-place): the rms reduction (with its __syncthreads) finishes before any write, and each
// thread writes only the elements it read. The multiply-add is done as two IEEE roundings
// (__fmul_rn/__fadd_rn) to match torch eager and the CPU kernel bit for bit in fp32.
// row_idx is NOT range-checked (that would need a host sync); it must lie in [0, E).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../include/emk_common.h"

namespace {

template <typename T> struct Cvt;
template <> struct Cvt<float> {
    __device__ __forceinline__ static float ld(const float* p, int64_t i) { return p[i]; }
    __device__ __forceinline__ static void st(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Cvt<__half> {
    __device__ __forceinline__ static float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
    __device__ __forceinline__ static void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
    __device__ __forceinline__ static float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
    __device__ __forceinline__ static void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

template <int BLOCK>
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[BLOCK / 32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < BLOCK / 32 ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;  // every thread holds the block total
}

template <typename TH, typename TT, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
gather_add_kernel(TH* __restrict__ out, const TH* h, const TT* __restrict__ table,
                  const int64_t* __restrict__ row_idx, const float* __restrict__ strength,
                  const bool* __restrict__ mask, int64_t T, int64_t d, bool rms_scale, float eps) {
    const int64_t row = blockIdx.x;
    const TH* hr = h + row * d;
    TH* o = out + row * d;
    if (!mask[row]) {
        if (o != hr)
            for (int64_t i = threadIdx.x; i < d; i += BLOCK) o[i] = hr[i];
        return;
    }
    const int64_t b = row / T;
    float scale = strength[b];
    if (rms_scale) {
        float ss = 0.0f;
        for (int64_t i = threadIdx.x; i < d; i += BLOCK) {
            const float x = Cvt<TH>::ld(hr, i);
            ss = __fadd_rn(ss, __fmul_rn(x, x));
        }
        ss = block_sum<BLOCK>(ss);
        scale = __fmul_rn(scale, sqrtf(ss / static_cast<float>(d) + eps));
    }
    const TT* v = table + row_idx[b] * d;
    for (int64_t i = threadIdx.x; i < d; i += BLOCK)
        Cvt<TH>::st(o, i, __fadd_rn(Cvt<TH>::ld(hr, i), __fmul_rn(scale, Cvt<TT>::ld(v, i))));
}

template <typename TH, typename TT>
void launch(void* out, const void* h, const void* table, const int64_t* row_idx,
            const float* strength, const bool* mask, int64_t rows, int64_t T, int64_t d,
            bool rms_scale, float eps, cudaStream_t stream) {
    if (d >= 1024) {
        gather_add_kernel<TH, TT, 256><<<static_cast<unsigned>(rows), 256, 0, stream>>>(
            static_cast<TH*>(out), static_cast<const TH*>(h), static_cast<const TT*>(table),
            row_idx, strength, mask, T, d, rms_scale, eps);
    } else {
        gather_add_kernel<TH, TT, 128><<<static_cast<unsigned>(rows), 128, 0, stream>>>(
            static_cast<TH*>(out), static_cast<const TH*>(h), static_cast<const TT*>(table),
            row_idx, strength, mask, T, d, rms_scale, eps);
    }
}

template <typename TH>
int dispatch_table(int table_dtype, void* out, const void* h, const void* table,
                   const int64_t* row_idx, const float* strength, const bool* mask, int64_t rows,
                   int64_t T, int64_t d, bool rms_scale, float eps, cudaStream_t stream) {
    switch (table_dtype) {
        case EMK_F32: launch<TH, float>(out, h, table, row_idx, strength, mask, rows, T, d, rms_scale, eps, stream); break;
        case EMK_F16: launch<TH, __half>(out, h, table, row_idx, strength, mask, rows, T, d, rms_scale, eps, stream); break;
        case EMK_BF16: launch<TH, __nv_bfloat16>(out, h, table, row_idx, strength, mask, rows, T, d, rms_scale, eps, stream); break;
        default: return EMK_BAD_DTYPE;
    }
    return EMK_OK;
}

}  // namespace

// Returns 0, EMK_BAD_DTYPE (<0), or a cudaError_t (>0) from the launch.
extern "C" int emk_gather_add_cuda(void* out, const void* h, const void* table,
                                   const int64_t* row_idx, const float* strength,
                                   const bool* pos_mask, int64_t B, int64_t T, int64_t d,
                                   int64_t E, int h_dtype, int table_dtype, bool rms_scale,
                                   float eps, cudaStream_t stream) {
    (void)E;
    const int64_t rows = B * T;
    if (rows <= 0 || d <= 0) return EMK_OK;
    if (rows > 0x7fffffffLL) return EMK_BAD_ARG;
    int st;
    switch (h_dtype) {
        case EMK_F32: st = dispatch_table<float>(table_dtype, out, h, table, row_idx, strength, pos_mask, rows, T, d, rms_scale, eps, stream); break;
        case EMK_F16: st = dispatch_table<__half>(table_dtype, out, h, table, row_idx, strength, pos_mask, rows, T, d, rms_scale, eps, stream); break;
        case EMK_BF16: st = dispatch_table<__nv_bfloat16>(table_dtype, out, h, table, row_idx, strength, pos_mask, rows, T, d, rms_scale, eps, stream); break;
        default: return EMK_BAD_DTYPE;
    }
    if (st != EMK_OK) return st;
    return static_cast<int>(cudaGetLastError());
}
