// capture_project, CUDA kernel + extern "C" launcher (torch-free). Math and shapes:
// emokernels/ops/capture_project.py.
//
//   P[b,k]    = sum_i h[b, index[b], i] * directions[k, i]   (fp32 accumulation, fp32 [B,K])
//   rows[b,:] = h[b, index[b], :]                            (optional, h's dtype, [B,d])
//
// Grid (B, ceil(K / NWARPS)); each warp of a block reduces one direction at a time over d
// (lanes stride over i, then a shuffle reduction); blocks with blockIdx.y == 0 copy the row.
// index is NOT range-checked (no host sync); it must lie in [0, T). K <= 64.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../include/emk_common.h"
#include "../include/emk_ops.h"

namespace {

using emk::Cvt;

constexpr int kWarps = 8;

template <typename TH, typename TD>
__global__ void __launch_bounds__(kWarps * 32)
capture_project_kernel(float* __restrict__ P, TH* __restrict__ rows, const TH* __restrict__ h,
                       const TD* __restrict__ dirs, const int64_t* __restrict__ index, int64_t T,
                       int64_t d, int K) {
    const int64_t b = blockIdx.x;
    const TH* hr = h + (b * T + index[b]) * d;
    if (rows != nullptr && blockIdx.y == 0)
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) rows[b * d + i] = hr[i];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int k = blockIdx.y * kWarps + warp;
    if (k >= K) return;
    const TD* v = dirs + static_cast<int64_t>(k) * d;
    float acc = 0.0f;
    for (int64_t i = lane; i < d; i += 32) acc += Cvt<TH>::ld(hr, i) * Cvt<TD>::ld(v, i);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) P[b * K + k] = acc;
}

template <typename TH, typename TD>
void launch(float* P, void* rows, const void* h, const void* dirs, const int64_t* index,
            int64_t B, int64_t T, int64_t d, int K, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((K + kWarps - 1) / kWarps));
    capture_project_kernel<TH, TD><<<grid, kWarps * 32, 0, stream>>>(
        P, static_cast<TH*>(rows), static_cast<const TH*>(h), static_cast<const TD*>(dirs), index,
        T, d, K);
}

}  // namespace

// rows == 0: no row copy. Returns 0, EMK_BAD_DTYPE / EMK_BAD_ARG (<0), or a cudaError_t (>0).
extern "C" int emk_capture_project_cuda(uintptr_t P, uintptr_t rows, uintptr_t h, uintptr_t directions,
                                        uintptr_t index, int64_t B, int64_t T, int64_t d, int64_t K,
                                        int h_dtype, int dir_dtype, uintptr_t stream) {
    if (K < 1 || K > 64 || B > 0x7fffffffLL) return EMK_BAD_ARG;
    if (B <= 0) return EMK_OK;
    EMK_CUDA_DISPATCH_DTYPE(h_dtype, TH,
        EMK_CUDA_DISPATCH_DTYPE(dir_dtype, TD,
            launch<TH, TD>(reinterpret_cast<float*>(P), reinterpret_cast<void*>(rows),
                           reinterpret_cast<const void*>(h), reinterpret_cast<const void*>(directions),
                           reinterpret_cast<const int64_t*>(index), B, T, d, static_cast<int>(K),
                           reinterpret_cast<cudaStream_t>(stream))));
    return static_cast<int>(cudaGetLastError());
}
