// gather_add, CPU (OpenMP) kernel. Math and shapes: emokernels/ops/gather_add.py.
//
//   out[b,t,:] = h[b,t,:] + pos_mask[b,t] * strength[b] * r[b,t] * table[row_idx[b], :]
//   r[b,t]     = sqrt(mean_i h[b,t,i]^2 + eps)   (fp32, on the input h)   if rms_scale else 1
//
// h/out: [B,T,d] contiguous, dtype h_dtype; table: [E,d] contiguous, dtype table_dtype;
// row_idx: int64 [B]; strength: fp32 [B]; pos_mask: bool (1 byte) [B,T].
// Masked-out positions are copied bit-exactly. out may equal h (in-place): each element is
// read before it is written, and the rms of a row is finished before the row is written.
#include "../include/emk_common.h"
#include "../include/emk_ops.h"

#include <cmath>
#include <cstring>

namespace {

template <typename TH, typename TT>
inline void edit_row(int64_t r, TH* out, const TH* h, const TT* table, const int64_t* row_idx,
                     const float* strength, const uint8_t* mask, int64_t T, int64_t d,
                     bool rms_scale, float eps) {
    const TH* hr = h + r * d;
    TH* o = out + r * d;
    if (!mask[r]) {
        if (o != hr) std::memcpy(static_cast<void*>(o), static_cast<const void*>(hr), sizeof(TH) * d);
        return;
    }
    const int64_t b = r / T;
    float scale = strength[b];
    if (rms_scale) {
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) {
            const float x = emk::load(hr, i);
            ss += x * x;
        }
        scale = scale * std::sqrt(ss / static_cast<float>(d) + eps);
    }
    const TT* v = table + row_idx[b] * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) emk::store(o, i, emk::load(hr, i) + scale * emk::load(v, i));
}

template <typename TH, typename TT>
void gather_add_kernel(TH* out, const TH* h, const TT* table, const int64_t* row_idx,
                       const float* strength, const uint8_t* mask, int64_t B, int64_t T,
                       int64_t d, bool rms_scale, float eps) {
    const int64_t rows = B * T;
    if (rows > 1 && rows * d >= emk::kParallelMinWork) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            edit_row(r, out, h, table, row_idx, strength, mask, T, d, rms_scale, eps);
    } else {  // decode-sized: no OpenMP region at all
        for (int64_t r = 0; r < rows; ++r)
            edit_row(r, out, h, table, row_idx, strength, mask, T, d, rms_scale, eps);
    }
}

}  // namespace

// Status (emk_ops.h): row_idx is range-checked before anything is written (B comparisons).
int64_t emk_gather_add_cpu(uintptr_t out, uintptr_t h, uintptr_t table, uintptr_t row_idx,
                           uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T,
                           int64_t d, int64_t E, int h_dtype, int table_dtype, bool rms_scale,
                           float eps) {
    const int64_t* idx = emk::cptr<int64_t>(row_idx);
    const int64_t bad = emk::first_out_of_range(idx, B, E);
    if (bad >= 0) return emk::range_error("row_idx", bad, "E", E);
    EMK_DISPATCH_DTYPE(h_dtype, TH,
        EMK_DISPATCH_DTYPE(table_dtype, TT,
            gather_add_kernel<TH, TT>(emk::mptr<TH>(out), emk::cptr<TH>(h), emk::cptr<TT>(table),
                                      idx, emk::cptr<float>(strength), emk::cptr<uint8_t>(pos_mask),
                                      B, T, d, rms_scale, eps)));
    return EMK_OK;
}
