// neuron_edit, CPU (OpenMP) kernel. Math and shapes: emokernels/ops/neuron_edit.py.
//
//   out[b,t,:] = a[b,t,:]                                                  (bit-exact copy)
//   out[b,t,index[j]] = a[b,t,index[j]] * scale[row_idx[b], j]
//                       + strength[b] * add[row_idx[b], j]      for j < n, where pos_mask[b,t]
//
// a/out: [B,T,N] contiguous (dtype); index: int64 [n] (distinct, in [0,N)); scale/add: fp32
// [E,n] contiguous or 0 (= absent: scale 1 / add 0); row_idx: int64 [B]; strength: fp32 [B];
// pos_mask: bool (1 byte) [B,T]. fp32 arithmetic, one rounding to the storage type.
//
// out may equal a (in-place): then nothing is copied and only the B*T*n selected elements of
// the masked rows are touched (the decode fast path). Each element is read before it is written.
#include "../include/emk_common.h"

#include <cstring>

namespace {

// Bytes copied below which the out-of-place kernel stays on the calling thread: a fork/join
// costs more than copying a decode batch (e.g. 8 x 8192 bf16 = 128 KiB), and far more when the
// cores are shared.
constexpr int64_t kParallelMinCopyBytes = int64_t(4) << 20;

template <typename T, bool HAS_SCALE, bool HAS_ADD>
void neuron_edit_kernel(T* out, const T* a, const int64_t* index, const float* scale,
                        const float* add, const int64_t* row_idx, const float* strength,
                        const uint8_t* mask, int64_t B, int64_t T_, int64_t N, int64_t n) {
    const int64_t rows = B * T_;
    const bool copy = out != a;
    // A row copy is memory-bound: forking pays off only for large copies (kParallelMinCopyBytes);
    // the sparse edit alone uses the shared element threshold.
    const bool par = rows > 1 && (copy ? rows * N * static_cast<int64_t>(sizeof(T)) >= kParallelMinCopyBytes
                                       : rows * n >= emk::kParallelMinWork);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < rows; ++r) {
        const T* ar = a + r * N;
        T* o = out + r * N;
        if (copy) std::memcpy(static_cast<void*>(o), static_cast<const void*>(ar), sizeof(T) * N);
        if (!mask[r]) continue;
        const int64_t b = r / T_;
        const int64_t e = row_idx[b];
        const float st = strength[b];
        const float* s = HAS_SCALE ? scale + e * n : nullptr;
        const float* v = HAS_ADD ? add + e * n : nullptr;
        for (int64_t j = 0; j < n; ++j) {
            const int64_t c = index[j];
            float x = emk::load(ar, c);
            if (HAS_SCALE) x = x * s[j];
            if (HAS_ADD) x = x + st * v[j];
            emk::store(o, c, x);
        }
    }
}

template <typename T>
void dispatch_tables(T* out, const T* a, const int64_t* index, const float* scale,
                     const float* add, const int64_t* row_idx, const float* strength,
                     const uint8_t* mask, int64_t B, int64_t T_, int64_t N, int64_t n) {
    if (scale && add)
        neuron_edit_kernel<T, true, true>(out, a, index, scale, add, row_idx, strength, mask, B, T_, N, n);
    else if (scale)
        neuron_edit_kernel<T, true, false>(out, a, index, scale, add, row_idx, strength, mask, B, T_, N, n);
    else if (add)
        neuron_edit_kernel<T, false, true>(out, a, index, scale, add, row_idx, strength, mask, B, T_, N, n);
    else
        neuron_edit_kernel<T, false, false>(out, a, index, scale, add, row_idx, strength, mask, B, T_, N, 0);
}

}  // namespace

// Returns 0 on success, EMK_BAD_DTYPE for an unknown dtype code, 1 + b for the first batch row
// whose row_idx is outside [0, E) (only checked when a table is given), or 1 + B + j for the
// first index[j] outside [0, N). Arguments are checked before anything is written (B + n
// comparisons).
int64_t emk_neuron_edit_cpu(uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale,
                            uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                            uintptr_t pos_mask, int64_t B, int64_t T, int64_t N, int64_t n,
                            int64_t E, int dtype) {
    const int64_t* ridx = emk::cptr<int64_t>(row_idx);
    const int64_t* cidx = emk::cptr<int64_t>(index);
    if (scale || add)
        for (int64_t b = 0; b < B; ++b)
            if (ridx[b] < 0 || ridx[b] >= E) return 1 + b;
    for (int64_t j = 0; j < n; ++j)
        if (cidx[j] < 0 || cidx[j] >= N) return 1 + B + j;
    EMK_DISPATCH_DTYPE(dtype, TA,
        dispatch_tables<TA>(emk::mptr<TA>(out), emk::cptr<TA>(a), cidx,
                            emk::cptr<float>(scale), emk::cptr<float>(add), ridx,
                            emk::cptr<float>(strength), emk::cptr<uint8_t>(pos_mask),
                            B, T, N, n));
    return EMK_OK;
}
