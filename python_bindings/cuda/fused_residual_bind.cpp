// pybind11 binding of the CUDA fused_add_rmsnorm launcher (csrc/cuda/fused_residual.cu).
// Torch-free: device pointers and the stream arrive as integers (tensor.data_ptr(),
// stream.cuda_stream).
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "emk_common.h"

namespace py = pybind11;

extern "C" int emk_fused_add_rmsnorm_cuda(void* m, void* n, float* P, const void* residual,
                                          const void* delta, const void* table,
                                          const int64_t* row_idx, const float* strength,
                                          const bool* pos_mask, const void* gamma,
                                          const float* dirs, const int64_t* readout, int64_t B,
                                          int64_t T, int64_t d, int64_t E, int64_t K, int dtype,
                                          bool table_f32, bool has_edit, bool rms_scale,
                                          bool has_norm, bool gemma, bool has_proj, float eps,
                                          float edit_eps, cudaStream_t stream);

void bind_fused_residual(py::module_& m) {
    m.def(
        "fused_add_rmsnorm",
        [](uintptr_t mo, uintptr_t no, uintptr_t P, uintptr_t residual, uintptr_t delta,
           uintptr_t table, uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask,
           uintptr_t gamma, uintptr_t dirs, uintptr_t readout, int64_t B, int64_t T, int64_t d,
           int64_t E, int64_t K, int dtype, bool table_f32, bool has_edit, bool rms_scale,
           bool has_norm, bool gemma, bool has_proj, float eps, float edit_eps,
           uintptr_t stream) {
            const int st = emk_fused_add_rmsnorm_cuda(
                reinterpret_cast<void*>(mo), reinterpret_cast<void*>(no),
                reinterpret_cast<float*>(P), reinterpret_cast<const void*>(residual),
                reinterpret_cast<const void*>(delta), reinterpret_cast<const void*>(table),
                reinterpret_cast<const int64_t*>(row_idx), reinterpret_cast<const float*>(strength),
                reinterpret_cast<const bool*>(pos_mask), reinterpret_cast<const void*>(gamma),
                reinterpret_cast<const float*>(dirs), reinterpret_cast<const int64_t*>(readout),
                B, T, d, E, K, dtype, table_f32, has_edit, rms_scale, has_norm, gemma, has_proj,
                eps, edit_eps, reinterpret_cast<cudaStream_t>(stream));
            if (st == EMK_BAD_DTYPE)
                throw py::value_error("fused_add_rmsnorm (cuda): unsupported dtype code");
            if (st < 0)
                throw py::value_error("fused_add_rmsnorm (cuda): bad argument (d > 16384 or too many rows)");
            if (st > 0)
                throw std::runtime_error(std::string("fused_add_rmsnorm (cuda): launch failed: ") +
                                         cudaGetErrorString(static_cast<cudaError_t>(st)));
        },
        "m = residual + delta (+ per-row edit), n = RMSNorm(m) * gamma, P = m[readout] @ dirs^T "
        "on raw device pointers (see emokernels/ops/fused_residual.py).");
}
