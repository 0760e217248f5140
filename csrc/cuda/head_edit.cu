// head_edit, CUDA kernel + extern "C" launcher. Math and shapes: emokernels/ops/head_edit.py.
//
//   out[b,t,:] = z[b,t,:]                                                  (bit-exact copy)
//   out[b,t,h*hd + i] = z[b,t,h*hd + i] * scale[row_idx[b], j]
//                       + strength[b] * add[row_idx[b], j, i]
//       for j < n, h = head_index[j], i < hd, where pos_mask[b,t]
//
// z/out: [B,T,H*hd] contiguous device memory (dtype code of emk_common.h); head_index: int64 [n]
// (distinct); scale: fp32 [E,n] or 0 (= 1); add: fp32 [E,n,hd] or 0 (= 0); row_idx: int64 [B];
// strength: fp32 [B]; pos_mask: bool (1 byte) [B,T]. fp32 arithmetic, one round-to-nearest-even.
//
// Grid: (row tiles, n). Block j handles head slot j for ROWS rows: ROWS*hd elements walked by the
// 128 threads with consecutive threads on consecutive channels of one head slice (coalesced for
// any hd, including non-powers of two such as 40 or 96; no padding lanes are wasted on tails).
// out != z: one cudaMemcpyAsync of z into out first, on the same stream. out == z: in place.
// The multiply and the add are two IEEE roundings (__fmul_rn/__fadd_rn, no FMA contraction)
// so fp32 results match torch eager and the CPU kernel bit for bit.
//
// No host synchronisation: device-side, a head_index[j] outside [0, H) is skipped and a
// row_idx[b] outside [0, E) writes NaN into the selected slices of that row. No torch headers.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../include/emk_common.h"

namespace emk_he {

template <typename T> __device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename T> __device__ __forceinline__ void st(T* p, int64_t i, float v);
template <> __device__ __forceinline__ void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void st<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

constexpr int kThreads = 128;
constexpr int64_t kTileElems = 2048;  // ROWS = max(1, kTileElems / hd) rows per block

template <typename T, bool HAS_SCALE, bool HAS_ADD>
__global__ void __launch_bounds__(kThreads)
head_edit_kernel(T* out, const T* z, const int64_t* __restrict__ head_index,
                 const float* __restrict__ scale, const float* __restrict__ add,
                 const int64_t* __restrict__ row_idx, const float* __restrict__ strength,
                 const uint8_t* __restrict__ mask, int64_t rows, int64_t T_, int64_t H,
                 int64_t hd, int64_t n, int64_t E, int64_t rows_per_block) {
    // z and out may alias (in place): no __restrict__ on them.
    const int64_t j = blockIdx.y;
    const int64_t h = head_index[j];
    if (h < 0 || h >= H) return;
    const int64_t D = H * hd;
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
    int64_t nr = rows - r0;
    if (nr > rows_per_block) nr = rows_per_block;
    const int64_t elems = nr * hd;
    for (int64_t k = threadIdx.x; k < elems; k += kThreads) {
        const int64_t rr = k / hd;
        const int64_t i = k - rr * hd;
        const int64_t r = r0 + rr;
        if (!mask[r]) continue;
        const int64_t b = r / T_;
        const int64_t e = row_idx[b];
        const int64_t off = r * D + h * hd + i;
        float x;
        if (e < 0 || e >= E) {
            x = __int_as_float(0x7fc00000);  // bad row id: NaN, loudly
        } else {
            x = ld(z, off);
            if (HAS_SCALE) x = __fmul_rn(x, scale[e * n + j]);
            if (HAS_ADD) x = __fadd_rn(x, __fmul_rn(strength[b], add[(e * n + j) * hd + i]));
        }
        st(out, off, x);
    }
}

template <typename T>
cudaError_t launch(T* out, const T* z, const int64_t* head_index, const float* scale,
                   const float* add, const int64_t* row_idx, const float* strength,
                   const uint8_t* mask, int64_t B, int64_t T_, int64_t H, int64_t hd, int64_t n,
                   int64_t E, cudaStream_t stream) {
    const int64_t rows = B * T_;
    if (rows == 0 || n == 0 || hd == 0 || (!scale && !add)) return cudaSuccess;
    int64_t rpb = kTileElems / hd;
    if (rpb < 1) rpb = 1;
    const int64_t tiles = (rows + rpb - 1) / rpb;
    if (tiles > 0x7fffffffLL || n > 65535) return cudaErrorInvalidConfiguration;
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(n));
#define EMK_HE_LAUNCH(S, A)                                                                  \
    head_edit_kernel<T, S, A><<<grid, kThreads, 0, stream>>>(                                \
        out, z, head_index, scale, add, row_idx, strength, mask, rows, T_, H, hd, n, E, rpb)
    if (scale && add) EMK_HE_LAUNCH(true, true);
    else if (scale) EMK_HE_LAUNCH(true, false);
    else EMK_HE_LAUNCH(false, true);
#undef EMK_HE_LAUNCH
    return cudaGetLastError();
}

}  // namespace emk_he

// Returns EMK_OK (0), EMK_BAD_DTYPE / EMK_BAD_ARG (< 0), or a positive cudaError_t.
extern "C" int emk_head_edit_cuda(uintptr_t out, uintptr_t z, uintptr_t head_index, uintptr_t scale,
                                  uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                                  uintptr_t pos_mask, int64_t B, int64_t T, int64_t H, int64_t hd,
                                  int64_t n, int64_t E, int dtype, uintptr_t stream) {
    if (B < 0 || T < 0 || H < 0 || hd < 0 || n < 0 || n > H) return EMK_BAD_ARG;
    size_t elem;
    switch (dtype) {
        case EMK_F32: elem = 4; break;
        case EMK_F16: case EMK_BF16: elem = 2; break;
        default: return EMK_BAD_DTYPE;
    }
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const int64_t numel = B * T * H * hd;
    if (out != z && numel > 0) {
        cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(z),
                                          elem * static_cast<size_t>(numel), cudaMemcpyDeviceToDevice, s);
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    const int64_t* hidx = reinterpret_cast<const int64_t*>(head_index);
    const float* sc = reinterpret_cast<const float*>(scale);
    const float* ad = reinterpret_cast<const float*>(add);
    const int64_t* ridx = reinterpret_cast<const int64_t*>(row_idx);
    const float* stg = reinterpret_cast<const float*>(strength);
    const uint8_t* m = reinterpret_cast<const uint8_t*>(pos_mask);
    cudaError_t err;
    switch (dtype) {
        case EMK_F32:
            err = emk_he::launch<float>(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(z),
                                        hidx, sc, ad, ridx, stg, m, B, T, H, hd, n, E, s);
            break;
        case EMK_F16:
            err = emk_he::launch<__half>(reinterpret_cast<__half*>(out), reinterpret_cast<const __half*>(z),
                                         hidx, sc, ad, ridx, stg, m, B, T, H, hd, n, E, s);
            break;
        default:
            err = emk_he::launch<__nv_bfloat16>(reinterpret_cast<__nv_bfloat16*>(out),
                                                reinterpret_cast<const __nv_bfloat16*>(z),
                                                hidx, sc, ad, ridx, stg, m, B, T, H, hd, n, E, s);
            break;
    }
    return static_cast<int>(err);
}
