// capture_project, CPU (OpenMP) kernel. Math and shapes: emokernels/ops/capture_project.py.
//
//   P[b,k]   = sum_i h[b, index[b], i] * directions[k, i]     (fp32 accumulation, fp32 out [B,K])
//   rows[b,:] = h[b, index[b], :]                             (optional, h's dtype, [B,d])
//
// h: [B,T,d] contiguous (h_dtype); directions: [K,d] contiguous (dir_dtype); index: int64 [B].
#include "../include/emk_common.h"
#include "../include/emk_ops.h"

#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// P[j] for jobs j in [j0, j1) of the flattened (b, k) grid; hbuf holds d floats.
template <typename TH, typename TD>
inline void project_range(float* P, const TH* h, const TD* dirs, const int64_t* index, int64_t T,
                          int64_t d, int64_t K, int64_t j0, int64_t j1, float* hbuf) {
    int64_t cur_b = -1;
    for (int64_t j = j0; j < j1; ++j) {
        const int64_t b = j / K, k = j - b * K;
        if (b != cur_b) {  // convert each needed row of h to fp32 once
            const TH* hr = h + (b * T + index[b]) * d;
            for (int64_t i = 0; i < d; ++i) hbuf[i] = emk::load(hr, i);
            cur_b = b;
        }
        const TD* v = dirs + k * d;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < d; ++i) acc += hbuf[i] * emk::load(v, i);
        P[j] = acc;
    }
}

template <typename TH, typename TD>
void capture_project_kernel(float* P, TH* rows_out, const TH* h, const TD* dirs,
                            const int64_t* index, int64_t B, int64_t T, int64_t d, int64_t K) {
    const int64_t jobs = B * K;
    if (jobs > 1 && jobs * d >= emk::kParallelMinWork) {
#pragma omp parallel
        {
            std::vector<float> hbuf(static_cast<size_t>(d));
#ifdef _OPENMP
            const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
            const int64_t nt = 1, tid = 0;
#endif
            // contiguous chunks of (b, k): a thread converts each row of h it needs once
            const int64_t chunk = (jobs + nt - 1) / nt;
            const int64_t j0 = tid * chunk, j1 = j0 + chunk < jobs ? j0 + chunk : jobs;
            if (j0 < j1) project_range(P, h, dirs, index, T, d, K, j0, j1, hbuf.data());
        }
    } else if (d <= 4096) {  // decode-sized: no OpenMP region, no heap allocation
        float hbuf[4096];
        project_range(P, h, dirs, index, T, d, K, 0, jobs, hbuf);
    } else {
        std::vector<float> hbuf(static_cast<size_t>(d));
        project_range(P, h, dirs, index, T, d, K, 0, jobs, hbuf.data());
    }
    if (rows_out != nullptr) {
        for (int64_t b = 0; b < B; ++b)
            std::memcpy(static_cast<void*>(rows_out + b * d),
                        static_cast<const void*>(h + (b * T + index[b]) * d), sizeof(TH) * d);
    }
}

}  // namespace

// rows == 0: do not copy rows. Status (emk_ops.h): index is range-checked before any write.
int64_t emk_capture_project_cpu(uintptr_t P, uintptr_t rows, uintptr_t h, uintptr_t directions,
                                uintptr_t index, int64_t B, int64_t T, int64_t d, int64_t K,
                                int h_dtype, int dir_dtype) {
    const int64_t* idx = emk::cptr<int64_t>(index);
    const int64_t bad = emk::first_out_of_range(idx, B, T);
    if (bad >= 0) return emk::range_error("index", bad, "T", T);
    EMK_DISPATCH_DTYPE(h_dtype, TH,
        EMK_DISPATCH_DTYPE(dir_dtype, TD,
            capture_project_kernel<TH, TD>(emk::mptr<float>(P), rows ? emk::mptr<TH>(rows) : nullptr,
                                           emk::cptr<TH>(h), emk::cptr<TD>(directions), idx,
                                           B, T, d, K)));
    return EMK_OK;
}
