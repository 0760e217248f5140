// pybind11 binding of the CUDA head_edit launcher (csrc/cuda/head_edit.cu). Torch-free.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

extern "C" int emk_head_edit_cuda(uintptr_t out, uintptr_t z, uintptr_t head_index, uintptr_t scale,
                                  uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                                  uintptr_t pos_mask, int64_t B, int64_t T, int64_t H, int64_t hd,
                                  int64_t n, int64_t E, int dtype, uintptr_t stream);

void bind_head_edit(py::module_& m) {
    m.def(
        "head_edit",
        [](uintptr_t out, uintptr_t z, uintptr_t head_index, uintptr_t scale, uintptr_t add,
           uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T,
           int64_t H, int64_t head_dim, int64_t n, int64_t E, int dtype, uintptr_t stream) {
            const int st = emk_head_edit_cuda(out, z, head_index, scale, add, row_idx, strength,
                                              pos_mask, B, T, H, head_dim, n, E, dtype, stream);
            if (st == -1) throw py::value_error("head_edit (cuda): unsupported dtype code");
            if (st < 0) throw py::value_error("head_edit (cuda): bad sizes");
            if (st > 0)
                throw std::runtime_error(std::string("head_edit (cuda): ") +
                                         cudaGetErrorString(static_cast<cudaError_t>(st)));
        },
        py::arg("out"), py::arg("z"), py::arg("head_index"), py::arg("scale"), py::arg("add"),
        py::arg("row_idx"), py::arg("strength"), py::arg("pos_mask"), py::arg("B"), py::arg("T"),
        py::arg("H"), py::arg("head_dim"), py::arg("n"), py::arg("E"), py::arg("dtype"),
        py::arg("stream"),
        "out = z; out[b,t,h*hd:(h+1)*hd] = z[...]*scale[row_idx[b],j] + "
        "strength[b]*add[row_idx[b],j,:] (h = head_index[j]) where pos_mask[b,t], on raw device "
        "pointers, enqueued on `stream` (scale/add 0 = absent; out == z works in place). "
        "See emokernels/ops/head_edit.py.");
}
