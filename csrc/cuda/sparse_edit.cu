// sparse_edit, CUDA kernel + extern "C" launcher. Math and shapes: emokernels/ops/sparse_edit.py.
//
//   out[b,t,:] = a[b,t,:]                                                  (bit-exact copy)
//   out[b,t,c*g + i] = a[b,t,c*g + i] * scale[row_idx[b], j] + strength[b] * add[row_idx[b], j, i]
//       for j < n, c = index[j], i < g, where pos_mask[b,t]
//
// a/out: [B,T,N] contiguous device memory, N = G*g (g = group: 1 for neurons, head_dim for heads);
// index: int64 [n] (distinct group ids); scale: fp32 [E,n] or 0 (= 1); add: fp32 [E,n,g] or 0
// (= 0); row_idx: int64 [B]; strength: fp32 [B]; pos_mask: bool (1 byte) [B,T].
//
// out != a: one cudaMemcpyAsync (device to device) of a into out, then the sparse kernel on the
// same stream. out == a: in place; only the B*T*n*g selected elements are read and written.
// One thread per (row, k) with k = j*g + i running over the n*g selected channels of a row, so
// consecutive threads touch consecutive channels of one group (coalesced for heads; neurons are
// scattered by nature); the tables (E*n*g floats) stay in L1/L2. The multiply and the add are two
// IEEE roundings (__fmul_rn/__fadd_rn, no FMA contraction) so fp32 results match torch eager and
// the CPU kernel bit for bit.
//
// No host synchronisation, so arguments in device memory are not validated on the host. Device
// side: an index[j] outside [0, G) is skipped (never written out of bounds), and a row_idx[b]
// outside [0, E) writes NaN into the selected channels of that row so the error is loud.
#include <cuda_runtime.h>

#include <cstdint>

#include "../include/emk_common.h"
#include "../include/emk_ops.h"

namespace {

using emk::Cvt;

template <typename T, bool HAS_SCALE, bool HAS_ADD>
__global__ void sparse_edit_kernel(T* out, const T* a, const int64_t* __restrict__ index,
                                   const float* __restrict__ scale, const float* __restrict__ add,
                                   const int64_t* __restrict__ row_idx,
                                   const float* __restrict__ strength,
                                   const uint8_t* __restrict__ mask, int64_t T_, int64_t N,
                                   int64_t G, int64_t g, int64_t n, int64_t E, int64_t total) {
    // a and out may alias (in place): no __restrict__ on them.
    const int64_t C = n * g;  // selected channels per row
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < total;
         q += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = q / C;
        if (!mask[r]) continue;
        const int64_t k = q - r * C;
        const int64_t j = k / g;
        const int64_t c = index[j];
        if (c < 0 || c >= G) continue;
        const int64_t b = r / T_;
        const int64_t e = row_idx[b];
        const int64_t off = r * N + c * g + (k - j * g);
        float x;
        if (e < 0 || e >= E) {
            x = __int_as_float(0x7fc00000);  // bad row id: NaN, loudly
        } else {
            x = Cvt<T>::ld(a, off);
            if (HAS_SCALE) x = __fmul_rn(x, scale[e * n + j]);
            if (HAS_ADD) x = __fadd_rn(x, __fmul_rn(strength[b], add[e * C + k]));
        }
        Cvt<T>::st(out, off, x);
    }
}

template <typename T>
cudaError_t launch(T* out, const T* a, const int64_t* index, const float* scale, const float* add,
                   const int64_t* row_idx, const float* strength, const uint8_t* mask, int64_t B,
                   int64_t T_, int64_t N, int64_t g, int64_t n, int64_t E, cudaStream_t stream) {
    const int64_t total = B * T_ * n * g;
    if (total == 0 || (!scale && !add)) return cudaSuccess;
    const int threads = 256;
    int64_t blocks = (total + threads - 1) / threads;
    if (blocks > 65535LL * 32) blocks = 65535LL * 32;  // grid-stride loop covers the rest
#define EMK_SE_LAUNCH(S, A)                                                                  \
    sparse_edit_kernel<T, S, A><<<(unsigned)blocks, threads, 0, stream>>>(                   \
        out, a, index, scale, add, row_idx, strength, mask, T_, N, N / g, g, n, E, total)
    if (scale && add) EMK_SE_LAUNCH(true, true);
    else if (scale) EMK_SE_LAUNCH(true, false);
    else EMK_SE_LAUNCH(false, true);
#undef EMK_SE_LAUNCH
    return cudaGetLastError();
}

}  // namespace

// Returns EMK_OK (0), EMK_BAD_DTYPE / EMK_BAD_ARG (< 0), or a positive cudaError_t.
extern "C" int emk_sparse_edit_cuda(uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale,
                                    uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                                    uintptr_t pos_mask, int64_t B, int64_t T, int64_t N,
                                    int64_t group, int64_t n, int64_t E, int dtype,
                                    uintptr_t stream) {
    if (B < 0 || T < 0 || N < 0 || n < 0 || group < 1 || N % group != 0 || n > N / group)
        return EMK_BAD_ARG;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    cudaError_t err = cudaSuccess;
    EMK_CUDA_DISPATCH_DTYPE(dtype, TA,
        if (out != a && B * T * N > 0)
            err = cudaMemcpyAsync(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(a),
                                  sizeof(TA) * static_cast<size_t>(B * T * N),
                                  cudaMemcpyDeviceToDevice, s);
        if (err == cudaSuccess)
            err = launch<TA>(reinterpret_cast<TA*>(out), reinterpret_cast<const TA*>(a),
                             reinterpret_cast<const int64_t*>(index),
                             reinterpret_cast<const float*>(scale),
                             reinterpret_cast<const float*>(add),
                             reinterpret_cast<const int64_t*>(row_idx),
                             reinterpret_cast<const float*>(strength),
                             reinterpret_cast<const uint8_t*>(pos_mask), B, T, N, group, n, E, s));
    return static_cast<int>(err);
}
