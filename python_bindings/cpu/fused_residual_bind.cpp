// pybind11 binding of the CPU fused_add_rmsnorm kernel (csrc/cpu/fused_residual.cpp). Torch-free.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

int64_t emk_fused_add_rmsnorm_cpu(uintptr_t m, uintptr_t n, uintptr_t P, uintptr_t residual,
                                  uintptr_t delta, uintptr_t table, uintptr_t row_idx,
                                  uintptr_t strength, uintptr_t pos_mask, uintptr_t gamma,
                                  uintptr_t dirs, uintptr_t readout, int64_t B, int64_t T,
                                  int64_t d, int64_t E, int64_t K, int dtype, bool table_f32,
                                  bool has_edit, bool rms_scale, bool has_norm, bool gemma,
                                  bool has_proj, float eps, float edit_eps);

void bind_fused_residual(py::module_& m) {
    m.def(
        "fused_add_rmsnorm",
        [](uintptr_t mo, uintptr_t no, uintptr_t P, uintptr_t residual, uintptr_t delta,
           uintptr_t table, uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask,
           uintptr_t gamma, uintptr_t dirs, uintptr_t readout, int64_t B, int64_t T, int64_t d,
           int64_t E, int64_t K, int dtype, bool table_f32, bool has_edit, bool rms_scale,
           bool has_norm, bool gemma, bool has_proj, float eps, float edit_eps) {
            int64_t st;
            {
                py::gil_scoped_release nogil;
                st = emk_fused_add_rmsnorm_cpu(mo, no, P, residual, delta, table, row_idx,
                                               strength, pos_mask, gamma, dirs, readout, B, T, d,
                                               E, K, dtype, table_f32, has_edit, rms_scale,
                                               has_norm, gemma, has_proj, eps, edit_eps);
            }
            if (st > 0)
                throw py::index_error("fused_add_rmsnorm: row_idx[" + std::to_string(st - 1) +
                                      "] is outside [0, E=" + std::to_string(E) + ")");
            if (st <= -100)
                throw py::index_error("fused_add_rmsnorm: readout[" + std::to_string(-st - 100) +
                                      "] is outside [0, T=" + std::to_string(T) + ")");
            if (st < 0) throw py::value_error("fused_add_rmsnorm: unsupported dtype code");
        },
        "m = residual + delta (+ per-row edit), n = RMSNorm(m) * gamma, P = m[readout] @ dirs^T "
        "on raw pointers (see emokernels/ops/fused_residual.py).");
}
