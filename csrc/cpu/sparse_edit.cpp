// sparse_edit, CPU (OpenMP) kernel. Math and shapes: emokernels/ops/sparse_edit.py.
//
//   out[b,t,:] = a[b,t,:]                                                  (bit-exact copy)
//   out[b,t,c*g + i] = a[b,t,c*g + i] * scale[row_idx[b], j] + strength[b] * add[row_idx[b], j, i]
//       for j < n, c = index[j], i < g, where pos_mask[b,t]
//
// a/out: [B,T,N] contiguous (dtype), N = G*g (g = group: 1 for MLP neurons, head_dim for heads);
// index: int64 [n] (distinct group ids in [0,G)); scale: fp32 [E,n] or 0 (= 1); add: fp32 [E,n,g]
// or 0 (= 0); row_idx: int64 [B]; strength: fp32 [B]; pos_mask: bool (1 byte) [B,T]. fp32
// arithmetic (a multiply and an add, no contraction), one rounding to the storage type.
//
// out may equal a (in place): then nothing is copied and only the B*T*n*g selected elements of
// the masked rows are touched (the decode fast path). Each element is read before it is written.
#include "../include/emk_common.h"
#include "../include/emk_ops.h"

#include <cstring>

namespace {

// Bytes copied below which the out-of-place kernel stays on the calling thread: a fork/join
// costs more than copying a decode batch (e.g. 8 x 8192 bf16 = 128 KiB), and far more when the
// cores are shared.
constexpr int64_t kParallelMinCopyBytes = int64_t(4) << 20;

template <typename T, bool HAS_SCALE, bool HAS_ADD>
void sparse_edit_kernel(T* out, const T* a, const int64_t* index, const float* scale,
                        const float* add, const int64_t* row_idx, const float* strength,
                        const uint8_t* mask, int64_t B, int64_t T_, int64_t N, int64_t g,
                        int64_t n) {
    const int64_t rows = B * T_;
    const bool copy = out != a;
    // A row copy is memory-bound: forking pays off only for large copies (kParallelMinCopyBytes);
    // the sparse edit alone uses the shared element threshold.
    const bool par = rows > 1 && (copy ? rows * N * static_cast<int64_t>(sizeof(T)) >= kParallelMinCopyBytes
                                       : rows * n * g >= emk::kParallelMinWork);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < rows; ++r) {
        const T* ar = a + r * N;
        T* o = out + r * N;
        if (copy) std::memcpy(static_cast<void*>(o), static_cast<const void*>(ar), sizeof(T) * N);
        if (!mask[r]) continue;
        const int64_t b = r / T_;
        const int64_t e = row_idx[b];
        const float st = strength[b];
        for (int64_t j = 0; j < n; ++j) {
            const int64_t off = index[j] * g;
            const float s = HAS_SCALE ? scale[e * n + j] : 1.0f;
            const float* v = HAS_ADD ? add + (e * n + j) * g : nullptr;
#pragma omp simd
            for (int64_t i = 0; i < g; ++i) {
                float x = emk::load(ar, off + i);
                if (HAS_SCALE) x = x * s;
                if (HAS_ADD) x = x + st * v[i];
                emk::store(o, off + i, x);
            }
        }
    }
}

}  // namespace

// Status (emk_ops.h): row_idx (when a table is given) and index are range-checked before
// anything is written (B + n comparisons).
int64_t emk_sparse_edit_cpu(uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale,
                            uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                            uintptr_t pos_mask, int64_t B, int64_t T, int64_t N, int64_t group,
                            int64_t n, int64_t E, int dtype) {
    if (group < 1 || N % group != 0) return EMK_BAD_ARG;
    const int64_t* ridx = emk::cptr<int64_t>(row_idx);
    const int64_t* gidx = emk::cptr<int64_t>(index);
    const int64_t G = N / group;
    const int64_t bad_row = (scale || add) ? emk::first_out_of_range(ridx, B, E) : -1;
    if (bad_row >= 0) return emk::range_error("row_idx", bad_row, "E", E);
    const int64_t bad_index = emk::first_out_of_range(gidx, n, G);
    if (bad_index >= 0) return emk::range_error("index", bad_index, "G", G);
    const float* sc = emk::cptr<float>(scale);
    const float* ad = emk::cptr<float>(add);
    if (!sc && !ad) n = 0;  // identity edit: the copy only
#define EMK_SE_CALL(S, A)                                                                      \
    sparse_edit_kernel<TA, S, A>(emk::mptr<TA>(out), emk::cptr<TA>(a), gidx, sc, ad, ridx,       \
                                 emk::cptr<float>(strength), emk::cptr<uint8_t>(pos_mask), B, T, \
                                 N, group, n)
    EMK_DISPATCH_DTYPE(dtype, TA,
        if (sc && ad) { EMK_SE_CALL(true, true); }
        else if (sc) { EMK_SE_CALL(true, false); }
        else if (ad) { EMK_SE_CALL(false, true); }
        else { EMK_SE_CALL(false, false); });
#undef EMK_SE_CALL
    return EMK_OK;
}
