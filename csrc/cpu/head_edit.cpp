// head_edit, CPU (OpenMP) kernel. Math and shapes: emokernels/ops/head_edit.py.
//
//   out[b,t,:] = z[b,t,:]                                                  (bit-exact copy)
//   out[b,t,h*hd + i] = z[b,t,h*hd + i] * scale[row_idx[b], j]
//                       + strength[b] * add[row_idx[b], j, i]
//       for j < n, h = head_index[j], i < hd, where pos_mask[b,t]
//
// z/out: [B,T,H*hd] contiguous (dtype); head_index: int64 [n] (distinct, in [0,H)); scale: fp32
// [E,n] or 0 (= 1); add: fp32 [E,n,hd] or 0 (= 0); row_idx: int64 [B]; strength: fp32 [B];
// pos_mask: bool (1 byte) [B,T]. fp32 arithmetic, one rounding to the storage type.
//
// out may equal z (in-place): then only the selected head slices of the masked rows are
// touched. Each element is read before it is written.
#include "../include/emk_common.h"

#include <cstring>

namespace {

// Bytes copied below which the out-of-place kernel stays on the calling thread: a fork/join
// costs more than copying a decode batch (e.g. 8 x 8192 bf16 = 128 KiB), and far more when the
// cores are shared.
constexpr int64_t kParallelMinCopyBytes = int64_t(4) << 20;

template <typename T, bool HAS_SCALE, bool HAS_ADD>
void head_edit_kernel(T* out, const T* z, const int64_t* head_index, const float* scale,
                      const float* add, const int64_t* row_idx, const float* strength,
                      const uint8_t* mask, int64_t B, int64_t T_, int64_t H, int64_t hd,
                      int64_t n) {
    const int64_t rows = B * T_;
    const int64_t D = H * hd;
    const bool copy = out != z;
    // A row copy is memory-bound: forking pays off only for large copies (kParallelMinCopyBytes);
    // the edit alone uses the shared element threshold.
    const bool par = rows > 1 && (copy ? rows * D * static_cast<int64_t>(sizeof(T)) >= kParallelMinCopyBytes
                                       : rows * n * hd >= emk::kParallelMinWork);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < rows; ++r) {
        const T* zr = z + r * D;
        T* o = out + r * D;
        if (copy) std::memcpy(static_cast<void*>(o), static_cast<const void*>(zr), sizeof(T) * D);
        if (!mask[r]) continue;
        const int64_t b = r / T_;
        const int64_t e = row_idx[b];
        const float st = strength[b];
        for (int64_t j = 0; j < n; ++j) {
            const int64_t off = head_index[j] * hd;
            const T* zs = zr + off;
            T* os = o + off;
            const float s = HAS_SCALE ? scale[e * n + j] : 1.0f;
            const float* v = HAS_ADD ? add + (e * n + j) * hd : nullptr;
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) {
                float x = emk::load(zs, i);
                if (HAS_SCALE) x = x * s;
                if (HAS_ADD) x = x + st * v[i];
                emk::store(os, i, x);
            }
        }
    }
}

template <typename T>
void dispatch_tables(T* out, const T* z, const int64_t* head_index, const float* scale,
                     const float* add, const int64_t* row_idx, const float* strength,
                     const uint8_t* mask, int64_t B, int64_t T_, int64_t H, int64_t hd,
                     int64_t n) {
    if (scale && add)
        head_edit_kernel<T, true, true>(out, z, head_index, scale, add, row_idx, strength, mask, B, T_, H, hd, n);
    else if (scale)
        head_edit_kernel<T, true, false>(out, z, head_index, scale, add, row_idx, strength, mask, B, T_, H, hd, n);
    else if (add)
        head_edit_kernel<T, false, true>(out, z, head_index, scale, add, row_idx, strength, mask, B, T_, H, hd, n);
    else
        head_edit_kernel<T, false, false>(out, z, head_index, scale, add, row_idx, strength, mask, B, T_, H, hd, 0);
}

}  // namespace

// Returns 0 on success, EMK_BAD_DTYPE for an unknown dtype code, 1 + b for the first batch row
// whose row_idx is outside [0, E) (only checked when a table is given), or 1 + B + j for the
// first head_index[j] outside [0, H). Checked before anything is written.
int64_t emk_head_edit_cpu(uintptr_t out, uintptr_t z, uintptr_t head_index, uintptr_t scale,
                          uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                          uintptr_t pos_mask, int64_t B, int64_t T, int64_t H, int64_t hd,
                          int64_t n, int64_t E, int dtype) {
    const int64_t* ridx = emk::cptr<int64_t>(row_idx);
    const int64_t* hidx = emk::cptr<int64_t>(head_index);
    if (scale || add)
        for (int64_t b = 0; b < B; ++b)
            if (ridx[b] < 0 || ridx[b] >= E) return 1 + b;
    for (int64_t j = 0; j < n; ++j)
        if (hidx[j] < 0 || hidx[j] >= H) return 1 + B + j;
    EMK_DISPATCH_DTYPE(dtype, TZ,
        dispatch_tables<TZ>(emk::mptr<TZ>(out), emk::cptr<TZ>(z), hidx,
                            emk::cptr<float>(scale), emk::cptr<float>(add), ridx,
                            emk::cptr<float>(strength), emk::cptr<uint8_t>(pos_mask),
                            B, T, H, hd, n));
    return EMK_OK;
}
