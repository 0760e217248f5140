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
#include "../include/emk_ops.h"

namespace {

using emk::Cvt;

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

}  // namespace

// Returns 0, EMK_BAD_DTYPE / EMK_BAD_ARG (<0), or a cudaError_t (>0) from the launch.
extern "C" int emk_gather_add_cuda(uintptr_t out, uintptr_t h, uintptr_t table, uintptr_t row_idx,
                                   uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T,
                                   int64_t d, int64_t E, int h_dtype, int table_dtype,
                                   bool rms_scale, float eps, uintptr_t stream) {
    (void)E;
    const int64_t rows = B * T;
    if (rows <= 0 || d <= 0) return EMK_OK;
    if (rows > 0x7fffffffLL) return EMK_BAD_ARG;
    EMK_CUDA_DISPATCH_DTYPE(h_dtype, TH,
        EMK_CUDA_DISPATCH_DTYPE(table_dtype, TT,
            launch<TH, TT>(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(h),
                           reinterpret_cast<const void*>(table),
                           reinterpret_cast<const int64_t*>(row_idx),
                           reinterpret_cast<const float*>(strength),
                           reinterpret_cast<const bool*>(pos_mask), rows, T, d, rms_scale, eps,
                           reinterpret_cast<cudaStream_t>(stream))));
    return static_cast<int>(cudaGetLastError());
}
