// pybind11 binding of the CPU neuron_edit kernel (csrc/cpu/neuron_edit.cpp). Torch-free.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

int64_t emk_neuron_edit_cpu(uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale,
                            uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                            uintptr_t pos_mask, int64_t B, int64_t T, int64_t N, int64_t n,
                            int64_t E, int dtype);

void bind_neuron_edit(py::module_& m) {
    m.def(
        "neuron_edit",
        [](uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale, uintptr_t add,
           uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T,
           int64_t N, int64_t n, int64_t E, int dtype) {
            int64_t st;
            {
                py::gil_scoped_release nogil;
                st = emk_neuron_edit_cpu(out, a, index, scale, add, row_idx, strength, pos_mask,
                                         B, T, N, n, E, dtype);
            }
            if (st > B)
                throw py::index_error("neuron_edit: index[" + std::to_string(st - 1 - B) +
                                      "] is outside [0, N=" + std::to_string(N) + ")");
            if (st > 0)
                throw py::index_error("neuron_edit: row_idx[" + std::to_string(st - 1) +
                                      "] is outside [0, E=" + std::to_string(E) + ")");
            if (st < 0) throw py::value_error("neuron_edit: unsupported dtype code");
        },
        py::arg("out"), py::arg("a"), py::arg("index"), py::arg("scale"), py::arg("add"),
        py::arg("row_idx"), py::arg("strength"), py::arg("pos_mask"), py::arg("B"), py::arg("T"),
        py::arg("N"), py::arg("n"), py::arg("E"), py::arg("dtype"),
        "out = a; out[b,t,index[j]] = a[b,t,index[j]]*scale[row_idx[b],j] + "
        "strength[b]*add[row_idx[b],j] where pos_mask[b,t], on raw pointers (scale/add 0 = "
        "absent; out == a works in place). See emokernels/ops/neuron_edit.py.");
}
