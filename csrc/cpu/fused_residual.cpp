// fused_add_rmsnorm, CPU (OpenMP) kernel. Math and shapes: emokernels/ops/fused_residual.py.
//
//   m0[b,t] = round(residual[b,t] + delta[b,t])                       (HF's residual add)
//   m[b,t]  = round(m0 + mask[b,t] * strength[b] * r[b,t] * table[row_idx[b]])   (if has_edit)
//   r[b,t]  = sqrt(mean_i m0^2 + edit_eps)  if rms_scale else 1
//   n[b,t]  = round(gamma * round(m * rsqrt(mean_i m^2 + eps)))        (Llama: weight * x.to(dtype))
//           = round(m * rsqrt(mean_i m^2 + eps) * (1 + gamma))          (Gemma)
//   P[b,k]  = sum_i m[b, readout[b], i] * dirs[k, i]                   (fp32)
//
// residual/delta/m/n: [B,T,d] contiguous, dtype TH; table: [E,d] (TH or fp32); gamma: [d] TH;
// dirs: fp32 [K,d]; row_idx, readout: int64 [B]; strength: fp32 [B]; pos_mask: bool [B,T].
// "round" is to TH, round-to-nearest-even, as torch. Each row is read from residual/delta once;
// the later passes over the row (rms of m0, the norm) re-read the freshly written m from L1.
#include "../include/emk_common.h"
#include "../include/emk_ops.h"

#include <cmath>

namespace {

template <typename T> inline float rnd(float v) { return v; }
template <> inline float rnd<emk::bf16_t>(float v) { return emk::bf16_to_f32(emk::f32_to_bf16(v)); }
template <> inline float rnd<emk::half_t>(float v) { return emk::f16_to_f32(emk::f32_to_f16(v)); }

template <typename TH, typename TT>
void fused_kernel(TH* mo, TH* no, float* P, const TH* res, const TH* del, const TT* table,
                  const int64_t* row_idx, const float* strength, const uint8_t* mask,
                  const TH* gamma, const float* dirs, const int64_t* readout, int64_t B,
                  int64_t T, int64_t d, int64_t K, bool has_edit, bool rms_scale, bool has_norm,
                  bool gemma, bool has_proj, float eps, float edit_eps) {
    const int64_t rows = B * T;
    const float fd = static_cast<float>(d);
#pragma omp parallel for schedule(static) if (rows > 1 && rows * d >= emk::kParallelMinWork)
    for (int64_t r = 0; r < rows; ++r) {
        const TH* x = res + r * d;
        const TH* y = del + r * d;
        TH* m = mo + r * d;
        const int64_t b = r / T;
        const bool edit = has_edit && mask[r];
        float ss = 0.0f;  // sum of m^2 (of the final, rounded m)
        if (!edit) {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < d; ++i) {
                const float v = rnd<TH>(emk::load(x, i) + emk::load(y, i));
                emk::store(m, i, v);
                ss += v * v;
            }
        } else {
            float scale = strength[b];
            const TT* tv = table + row_idx[b] * d;
            if (rms_scale) {
                float s0 = 0.0f;
#pragma omp simd reduction(+ : s0)
                for (int64_t i = 0; i < d; ++i) {
                    const float v = rnd<TH>(emk::load(x, i) + emk::load(y, i));
                    emk::store(m, i, v);
                    s0 += v * v;
                }
                scale = scale * std::sqrt(s0 / fd + edit_eps);
#pragma omp simd reduction(+ : ss)
                for (int64_t i = 0; i < d; ++i) {
                    const float v = rnd<TH>(emk::load(m, i) + scale * emk::load(tv, i));
                    emk::store(m, i, v);
                    ss += v * v;
                }
            } else {
#pragma omp simd reduction(+ : ss)
                for (int64_t i = 0; i < d; ++i) {
                    const float m0 = rnd<TH>(emk::load(x, i) + emk::load(y, i));
                    const float v = rnd<TH>(m0 + scale * emk::load(tv, i));
                    emk::store(m, i, v);
                    ss += v * v;
                }
            }
        }
        if (has_norm) {
            const float inv = 1.0f / std::sqrt(ss / fd + eps);
            TH* n = no + r * d;
            if (gemma) {
#pragma omp simd
                for (int64_t i = 0; i < d; ++i)
                    emk::store(n, i, emk::load(m, i) * inv * (1.0f + emk::load(gamma, i)));
            } else {
#pragma omp simd
                for (int64_t i = 0; i < d; ++i)
                    emk::store(n, i, emk::load(gamma, i) * rnd<TH>(emk::load(m, i) * inv));
            }
        }
        if (has_proj && r - b * T == readout[b]) {
            for (int64_t k = 0; k < K; ++k) {
                const float* dk = dirs + k * d;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t i = 0; i < d; ++i) acc += emk::load(m, i) * dk[i];
                P[b * K + k] = acc;
            }
        }
    }
}

}  // namespace

// Status (emk_ops.h): row_idx (with an edit) and readout (with projections) are range-checked
// before anything is written (B comparisons each).
int64_t emk_fused_add_rmsnorm_cpu(uintptr_t m, uintptr_t n, uintptr_t P, uintptr_t residual,
                                  uintptr_t delta, uintptr_t table, uintptr_t row_idx,
                                  uintptr_t strength, uintptr_t pos_mask, uintptr_t gamma,
                                  uintptr_t dirs, uintptr_t readout, int64_t B, int64_t T,
                                  int64_t d, int64_t E, int64_t K, int dtype, bool table_f32,
                                  bool has_edit, bool rms_scale, bool has_norm, bool gemma,
                                  bool has_proj, float eps, float edit_eps) {
    const int64_t* idx = emk::cptr<int64_t>(row_idx);
    const int64_t* ro = emk::cptr<int64_t>(readout);
    const int64_t bad_row = has_edit ? emk::first_out_of_range(idx, B, E) : -1;
    if (bad_row >= 0) return emk::range_error("row_idx", bad_row, "E", E);
    const int64_t bad_readout = has_proj ? emk::first_out_of_range(ro, B, T) : -1;
    if (bad_readout >= 0) return emk::range_error("readout", bad_readout, "T", T);
#define EMK_FUSED_CALL(TT_)                                                                     \
    fused_kernel<TH, TT_>(emk::mptr<TH>(m), emk::mptr<TH>(n), emk::mptr<float>(P),             \
                          emk::cptr<TH>(residual), emk::cptr<TH>(delta), emk::cptr<TT_>(table), \
                          idx, emk::cptr<float>(strength), emk::cptr<uint8_t>(pos_mask),        \
                          emk::cptr<TH>(gamma), emk::cptr<float>(dirs), ro, B, T, d, K,         \
                          has_edit, rms_scale, has_norm, gemma, has_proj, eps, edit_eps)
    EMK_DISPATCH_DTYPE(dtype, TH,
        if (table_f32) { EMK_FUSED_CALL(float); } else { EMK_FUSED_CALL(TH); });
#undef EMK_FUSED_CALL
    return EMK_OK;
}
