// pybind11 binding of the CPU head_edit kernel (csrc/cpu/head_edit.cpp). Torch-free.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

int64_t emk_head_edit_cpu(uintptr_t out, uintptr_t z, uintptr_t head_index, uintptr_t scale,
                          uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                          uintptr_t pos_mask, int64_t B, int64_t T, int64_t H, int64_t hd,
                          int64_t n, int64_t E, int dtype);

void bind_head_edit(py::module_& m) {
    m.def(
        "head_edit",
        [](uintptr_t out, uintptr_t z, uintptr_t head_index, uintptr_t scale, uintptr_t add,
           uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T,
           int64_t H, int64_t head_dim, int64_t n, int64_t E, int dtype) {
            int64_t st;
            {
                py::gil_scoped_release nogil;
                st = emk_head_edit_cpu(out, z, head_index, scale, add, row_idx, strength,
                                       pos_mask, B, T, H, head_dim, n, E, dtype);
            }
            if (st > B)
                throw py::index_error("head_edit: head_index[" + std::to_string(st - 1 - B) +
                                      "] is outside [0, H=" + std::to_string(H) + ")");
            if (st > 0)
                throw py::index_error("head_edit: row_idx[" + std::to_string(st - 1) +
                                      "] is outside [0, E=" + std::to_string(E) + ")");
            if (st < 0) throw py::value_error("head_edit: unsupported dtype code");
        },
        py::arg("out"), py::arg("z"), py::arg("head_index"), py::arg("scale"), py::arg("add"),
        py::arg("row_idx"), py::arg("strength"), py::arg("pos_mask"), py::arg("B"), py::arg("T"),
        py::arg("H"), py::arg("head_dim"), py::arg("n"), py::arg("E"), py::arg("dtype"),
        "out = z; out[b,t,h*hd:(h+1)*hd] = z[...]*scale[row_idx[b],j] + "
        "strength[b]*add[row_idx[b],j,:] (h = head_index[j]) where pos_mask[b,t], on raw "
        "pointers (scale/add 0 = absent; out == z works in place). See emokernels/ops/head_edit.py.");
}
