// pybind11 binding of the CPU capture_project kernel (csrc/cpu/capture_project.cpp). Torch-free.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

int64_t emk_capture_project_cpu(uintptr_t P, uintptr_t rows, uintptr_t h, uintptr_t directions,
                                uintptr_t index, int64_t B, int64_t T, int64_t d, int64_t K,
                                int h_dtype, int dir_dtype);

void bind_capture_project(py::module_& m) {
    m.def(
        "capture_project",
        [](uintptr_t P, uintptr_t rows, uintptr_t h, uintptr_t directions, uintptr_t index,
           int64_t B, int64_t T, int64_t d, int64_t K, int h_dtype, int dir_dtype) {
            int64_t st;
            if (B * K * d < (int64_t{1} << 16)) {  // decode-sized: keep the GIL (cheaper)
                st = emk_capture_project_cpu(P, rows, h, directions, index, B, T, d, K, h_dtype,
                                             dir_dtype);
            } else {
                py::gil_scoped_release nogil;
                st = emk_capture_project_cpu(P, rows, h, directions, index, B, T, d, K, h_dtype,
                                             dir_dtype);
            }
            if (st > 0)
                throw py::index_error("capture_project: index[" + std::to_string(st - 1) +
                                      "] is outside [0, T=" + std::to_string(T) + ")");
            if (st < 0) throw py::value_error("capture_project: unsupported dtype code");
        },
        py::arg("P"), py::arg("rows"), py::arg("h"), py::arg("directions"), py::arg("index"),
        py::arg("B"), py::arg("T"), py::arg("d"), py::arg("K"), py::arg("h_dtype"),
        py::arg("dir_dtype"),
        "P[b,k] = <h[b,index[b]], directions[k]> (fp32), rows[b] = h[b,index[b]] if rows != 0, "
        "on raw pointers (see emokernels/ops/capture_project.py).");
}
