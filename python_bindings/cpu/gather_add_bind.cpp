// pybind11 binding of the CPU gather_add kernel (csrc/cpu/gather_add.cpp). Torch-free.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

int64_t emk_gather_add_cpu(uintptr_t out, uintptr_t h, uintptr_t table, uintptr_t row_idx,
                           uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T,
                           int64_t d, int64_t E, int h_dtype, int table_dtype, bool rms_scale,
                           float eps);

void bind_gather_add(py::module_& m) {
    m.def(
        "gather_add",
        [](uintptr_t out, uintptr_t h, uintptr_t table, uintptr_t row_idx, uintptr_t strength,
           uintptr_t pos_mask, int64_t B, int64_t T, int64_t d, int64_t E, int h_dtype,
           int table_dtype, bool rms_scale, float eps) {
            int64_t st;
            if (B * T * d < (int64_t{1} << 16)) {  // decode-sized: keep the GIL (cheaper)
                st = emk_gather_add_cpu(out, h, table, row_idx, strength, pos_mask, B, T, d, E,
                                        h_dtype, table_dtype, rms_scale, eps);
            } else {
                py::gil_scoped_release nogil;
                st = emk_gather_add_cpu(out, h, table, row_idx, strength, pos_mask, B, T, d, E,
                                        h_dtype, table_dtype, rms_scale, eps);
            }
            if (st > 0)
                throw py::index_error("gather_add: row_idx[" + std::to_string(st - 1) +
                                      "] is outside [0, E=" + std::to_string(E) + ")");
            if (st < 0) throw py::value_error("gather_add: unsupported dtype code");
        },
        py::arg("out"), py::arg("h"), py::arg("table"), py::arg("row_idx"), py::arg("strength"),
        py::arg("pos_mask"), py::arg("B"), py::arg("T"), py::arg("d"), py::arg("E"),
        py::arg("h_dtype"), py::arg("table_dtype"), py::arg("rms_scale"), py::arg("eps"),
        "out[b,t] = h[b,t] + mask[b,t]*strength[b]*r[b,t]*table[row_idx[b]] on raw pointers "
        "(see emokernels/ops/gather_add.py).");
}
