// fused_add_rmsnorm, CUDA kernel + extern "C" launcher (torch-free). Math and shapes:
// emokernels/ops/fused_residual.py.
//
//   m0[b,t] = round(residual[b,t] + delta[b,t])                       (HF's residual add)
//   m[b,t]  = round(m0 + mask[b,t] * strength[b] * r[b,t] * table[row_idx[b]])   (if has_edit)
//   r[b,t]  = sqrt(mean_i m0^2 + edit_eps)  if rms_scale else 1
//   n[b,t]  = round(gamma * round(m * rsqrt(mean_i m^2 + eps)))        (Llama: weight * x.to(dtype))
//           = round(m * rsqrt(mean_i m^2 + eps) * (1 + gamma))          (Gemma)
//   P[b,k]  = sum_i m[b, readout[b], i] * dirs[k, i]                   (fp32)
//
// One thread block per (b, t) row; the row lives in registers: residual and delta are read once,
// m and n written once. Two kernels: a vectorised one (16-byte loads/stores, 4 chunks of 16 bytes
// per thread) when d is a multiple of 16 bytes' worth of elements and the row pointers are
// 16-byte aligned, else a scalar one (VPT values per thread, element i = threadIdx.x + j * BLOCK).
// d <= 16384 (the Python side checks).
// The residual add and the edit's multiply-add are done with explicit IEEE roundings
// (__fadd_rn/__fmul_rn: no FMA contraction) to match torch eager bit for bit in fp32.
// row_idx and readout are NOT range-checked (that would need a host sync).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../include/emk_common.h"
#include "../include/emk_ops.h"

namespace {

using emk::Cvt;

// Block-wide sum; every thread gets the total. Safe to call repeatedly (trailing barrier).
template <int BLOCK>
__device__ __forceinline__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < BLOCK / 32 ? red[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;
}

template <typename TH, typename TT, int BLOCK, int VPT>
__global__ void __launch_bounds__(BLOCK)
fused_add_rmsnorm_kernel(TH* __restrict__ mo, TH* __restrict__ no, float* __restrict__ P,
                         const TH* __restrict__ res, const TH* __restrict__ del,
                         const TT* __restrict__ table, const int64_t* __restrict__ row_idx,
                         const float* __restrict__ strength, const bool* __restrict__ mask,
                         const TH* __restrict__ gamma, const float* __restrict__ dirs,
                         const int64_t* __restrict__ readout, int64_t T, int64_t d, int64_t K,
                         bool has_edit, bool rms_scale, bool has_norm, bool gemma, bool has_proj,
                         float eps, float edit_eps) {
    __shared__ float red[BLOCK / 32];
    const int64_t row = blockIdx.x;
    const int64_t b = row / T;
    const int64_t off = row * d;
    const float fd = static_cast<float>(d);
    float v[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int64_t i = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
        v[j] = i < d ? Cvt<TH>::rnd(__fadd_rn(Cvt<TH>::ld(res, off + i), Cvt<TH>::ld(del, off + i))) : 0.0f;
    }
    if (has_edit && mask[row]) {  // uniform over the block: the barriers below are safe
        float scale = strength[b];
        if (rms_scale) {
            float ss = 0.0f;
#pragma unroll
            for (int j = 0; j < VPT; ++j) ss = __fadd_rn(ss, __fmul_rn(v[j], v[j]));
            ss = block_sum<BLOCK>(ss, red);
            scale = __fmul_rn(scale, sqrtf(ss / fd + edit_eps));
        }
        const TT* tv = table + row_idx[b] * d;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int64_t i = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
            if (i < d) v[j] = Cvt<TH>::rnd(__fadd_rn(v[j], __fmul_rn(scale, Cvt<TT>::ld(tv, i))));
        }
    }
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int64_t i = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
        if (i < d) Cvt<TH>::st(mo, off + i, v[j]);
    }
    if (has_norm) {
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) ss = __fadd_rn(ss, __fmul_rn(v[j], v[j]));
        ss = block_sum<BLOCK>(ss, red);
        const float inv = rsqrtf(ss / fd + eps);
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int64_t i = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
            if (i < d) {
                const float g = Cvt<TH>::ld(gamma, i);
                const float xn = __fmul_rn(v[j], inv);
                const float out = gemma ? __fmul_rn(xn, 1.0f + g) : __fmul_rn(g, Cvt<TH>::rnd(xn));
                Cvt<TH>::st(no, off + i, out);
            }
        }
    }
    if (has_proj && readout[b] == row - b * T) {  // uniform over the block
        for (int64_t k = 0; k < K; ++k) {
            float acc = 0.0f;
#pragma unroll
            for (int j = 0; j < VPT; ++j) {
                const int64_t i = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
                if (i < d) acc += v[j] * dirs[k * d + i];
            }
            acc = block_sum<BLOCK>(acc, red);
            if (threadIdx.x == 0) P[b * K + k] = acc;
        }
    }
}


// Vectorised variant: each thread owns CPT chunks of VEC contiguous elements (16-byte loads and
// stores of residual, delta, m, n, gamma), chunk c = threadIdx.x + j * BLOCK. Used when d % VEC == 0
// and every row pointer is 16-byte aligned; same arithmetic as the scalar kernel above.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename TH, typename TT, int BLOCK, int CPT>
__global__ void __launch_bounds__(BLOCK)
fused_add_rmsnorm_vec_kernel(TH* __restrict__ mo, TH* __restrict__ no, float* __restrict__ P,
                             const TH* __restrict__ res, const TH* __restrict__ del,
                             const TT* __restrict__ table, const int64_t* __restrict__ row_idx,
                             const float* __restrict__ strength, const bool* __restrict__ mask,
                             const TH* __restrict__ gamma, const float* __restrict__ dirs,
                             const int64_t* __restrict__ readout, int64_t T, int64_t d, int64_t K,
                             bool has_edit, bool rms_scale, bool has_norm, bool gemma,
                             bool has_proj, float eps, float edit_eps) {
    constexpr int VEC = 16 / sizeof(TH);
    using PackT = Pack<TH, VEC>;
    __shared__ float red[BLOCK / 32];
    const int64_t row = blockIdx.x;
    const int64_t b = row / T;
    const int64_t off = row * d;
    const int64_t chunks = d / VEC;
    const float fd = static_cast<float>(d);
    float v[CPT][VEC];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
        if (c < chunks) {
            const PackT x = reinterpret_cast<const PackT*>(res + off)[c];
            const PackT y = reinterpret_cast<const PackT*>(del + off)[c];
#pragma unroll
            for (int q = 0; q < VEC; ++q)
                v[j][q] = Cvt<TH>::rnd(__fadd_rn(Cvt<TH>::ld(x.v, q), Cvt<TH>::ld(y.v, q)));
        } else {
#pragma unroll
            for (int q = 0; q < VEC; ++q) v[j][q] = 0.0f;
        }
    }
    if (has_edit && mask[row]) {  // uniform over the block
        float scale = strength[b];
        if (rms_scale) {
            float ss = 0.0f;
#pragma unroll
            for (int j = 0; j < CPT; ++j)
#pragma unroll
                for (int q = 0; q < VEC; ++q) ss = __fadd_rn(ss, __fmul_rn(v[j][q], v[j][q]));
            ss = block_sum<BLOCK>(ss, red);
            scale = __fmul_rn(scale, sqrtf(ss / fd + edit_eps));
        }
        const TT* tv = table + row_idx[b] * d;
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const int64_t c = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
            if (c < chunks)
#pragma unroll
                for (int q = 0; q < VEC; ++q)
                    v[j][q] = Cvt<TH>::rnd(__fadd_rn(v[j][q], __fmul_rn(scale, Cvt<TT>::ld(tv, c * VEC + q))));
        }
    }
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
        if (c < chunks) {
            PackT o;
#pragma unroll
            for (int q = 0; q < VEC; ++q) Cvt<TH>::st(o.v, q, v[j][q]);
            reinterpret_cast<PackT*>(mo + off)[c] = o;
        }
    }
    if (has_norm) {
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < CPT; ++j)
#pragma unroll
            for (int q = 0; q < VEC; ++q) ss = __fadd_rn(ss, __fmul_rn(v[j][q], v[j][q]));
        ss = block_sum<BLOCK>(ss, red);
        const float inv = rsqrtf(ss / fd + eps);
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const int64_t c = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
            if (c < chunks) {
                const PackT g = reinterpret_cast<const PackT*>(gamma)[c];
                PackT o;
#pragma unroll
                for (int q = 0; q < VEC; ++q) {
                    const float gq = Cvt<TH>::ld(g.v, q);
                    const float xn = __fmul_rn(v[j][q], inv);
                    Cvt<TH>::st(o.v, q, gemma ? __fmul_rn(xn, 1.0f + gq) : __fmul_rn(gq, Cvt<TH>::rnd(xn)));
                }
                reinterpret_cast<PackT*>(no + off)[c] = o;
            }
        }
    }
    if (has_proj && readout[b] == row - b * T) {  // uniform over the block
        for (int64_t k = 0; k < K; ++k) {
            float acc = 0.0f;
#pragma unroll
            for (int j = 0; j < CPT; ++j) {
                const int64_t c = threadIdx.x + static_cast<int64_t>(j) * BLOCK;
                if (c < chunks)
#pragma unroll
                    for (int q = 0; q < VEC; ++q) acc += v[j][q] * dirs[k * d + c * VEC + q];
            }
            acc = block_sum<BLOCK>(acc, red);
            if (threadIdx.x == 0) P[b * K + k] = acc;
        }
    }
}

struct Args {
    void* m; void* n; float* P; const void* res; const void* del; const void* table;
    const int64_t* row_idx; const float* strength; const bool* mask; const void* gamma;
    const float* dirs; const int64_t* readout; int64_t T, d, K;
    bool has_edit, rms_scale, has_norm, gemma, has_proj; float eps, edit_eps;
};

template <typename TH, typename TT, int BLOCK, int VPT>
void launch(const Args& a, int64_t rows, cudaStream_t stream) {
    fused_add_rmsnorm_kernel<TH, TT, BLOCK, VPT><<<static_cast<unsigned>(rows), BLOCK, 0, stream>>>(
        static_cast<TH*>(a.m), static_cast<TH*>(a.n), a.P, static_cast<const TH*>(a.res),
        static_cast<const TH*>(a.del), static_cast<const TT*>(a.table), a.row_idx, a.strength,
        a.mask, static_cast<const TH*>(a.gamma), a.dirs, a.readout, a.T, a.d, a.K, a.has_edit,
        a.rms_scale, a.has_norm, a.gemma, a.has_proj, a.eps, a.edit_eps);
}

template <typename TH, typename TT, int BLOCK>
void launch_vec(const Args& a, int64_t rows, cudaStream_t stream) {
    fused_add_rmsnorm_vec_kernel<TH, TT, BLOCK, 4><<<static_cast<unsigned>(rows), BLOCK, 0, stream>>>(
        static_cast<TH*>(a.m), static_cast<TH*>(a.n), a.P, static_cast<const TH*>(a.res),
        static_cast<const TH*>(a.del), static_cast<const TT*>(a.table), a.row_idx, a.strength,
        a.mask, static_cast<const TH*>(a.gamma), a.dirs, a.readout, a.T, a.d, a.K, a.has_edit,
        a.rms_scale, a.has_norm, a.gemma, a.has_proj, a.eps, a.edit_eps);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename TH, typename TT>
int pick(const Args& a, int64_t rows, cudaStream_t stream) {
    constexpr int VEC = 16 / sizeof(TH);
    // Few rows (decode): the scalar kernel's wider blocks finish a row sooner (H200, d = 3072, bf16,
    // in a CUDA graph: 3.7 us scalar vs 4.9 us vectorised at 1-8 rows); many rows (prefill): the
    // 16-byte accesses win (8x128 rows: 9.3 vs 10.7 us).
    const bool vec_ok = rows >= 128 && a.d % VEC == 0 && aligned16(a.m) && aligned16(a.res) && aligned16(a.del) &&
                        (!a.has_norm || (aligned16(a.n) && aligned16(a.gamma)));
    if (vec_ok) {  // 4 chunks of VEC elements per thread
        const int64_t threads = (a.d / VEC + 3) / 4;
        if (threads <= 64) { launch_vec<TH, TT, 64>(a, rows, stream); return EMK_OK; }
        if (threads <= 128) { launch_vec<TH, TT, 128>(a, rows, stream); return EMK_OK; }
        if (threads <= 256) { launch_vec<TH, TT, 256>(a, rows, stream); return EMK_OK; }
        if (threads <= 512) { launch_vec<TH, TT, 512>(a, rows, stream); return EMK_OK; }
        if (threads <= 1024) { launch_vec<TH, TT, 1024>(a, rows, stream); return EMK_OK; }
    }
    if (a.d <= 1024) launch<TH, TT, 128, 8>(a, rows, stream);
    else if (a.d <= 2048) launch<TH, TT, 256, 8>(a, rows, stream);
    else if (a.d <= 4096) launch<TH, TT, 512, 8>(a, rows, stream);
    else if (a.d <= 8192) launch<TH, TT, 1024, 8>(a, rows, stream);
    else if (a.d <= 16384) launch<TH, TT, 1024, 16>(a, rows, stream);
    else return EMK_BAD_ARG;
    return EMK_OK;
}

template <typename TH>
int dispatch_table(bool table_f32, const Args& a, int64_t rows, cudaStream_t stream) {
    return table_f32 ? pick<TH, float>(a, rows, stream) : pick<TH, TH>(a, rows, stream);
}

}  // namespace

// Returns 0, EMK_BAD_DTYPE / EMK_BAD_ARG (<0: unknown dtype, d > 16384 or too many rows), or a
// cudaError_t (>0) from the launch.
extern "C" int emk_fused_add_rmsnorm_cuda(uintptr_t m, uintptr_t n, uintptr_t P, uintptr_t residual,
                                          uintptr_t delta, uintptr_t table, uintptr_t row_idx,
                                          uintptr_t strength, uintptr_t pos_mask, uintptr_t gamma,
                                          uintptr_t dirs, uintptr_t readout, int64_t B, int64_t T,
                                          int64_t d, int64_t E, int64_t K, int dtype,
                                          bool table_f32, bool has_edit, bool rms_scale,
                                          bool has_norm, bool gemma, bool has_proj, float eps,
                                          float edit_eps, uintptr_t stream_) {
    (void)E;
    const int64_t rows = B * T;
    if (rows <= 0 || d <= 0) return EMK_OK;
    if (rows > 0x7fffffffLL || d > 16384) return EMK_BAD_ARG;
    const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
    Args a{reinterpret_cast<void*>(m), reinterpret_cast<void*>(n), reinterpret_cast<float*>(P),
           reinterpret_cast<const void*>(residual), reinterpret_cast<const void*>(delta),
           reinterpret_cast<const void*>(table), reinterpret_cast<const int64_t*>(row_idx),
           reinterpret_cast<const float*>(strength), reinterpret_cast<const bool*>(pos_mask),
           reinterpret_cast<const void*>(gamma), reinterpret_cast<const float*>(dirs),
           reinterpret_cast<const int64_t*>(readout),
           T, d, K, has_edit, rms_scale, has_norm, gemma, has_proj, eps, edit_eps};
    int st;
    EMK_CUDA_DISPATCH_DTYPE(dtype, TH, st = dispatch_table<TH>(table_f32, a, rows, stream));
    if (st != EMK_OK) return st;
    return static_cast<int>(cudaGetLastError());
}
