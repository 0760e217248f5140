// pybind11 binding of the CUDA neuron_edit launcher (csrc/cuda/neuron_edit.cu). Torch-free.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

extern "C" int emk_neuron_edit_cuda(uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale,
                                    uintptr_t add, uintptr_t row_idx, uintptr_t strength,
                                    uintptr_t pos_mask, int64_t B, int64_t T, int64_t N, int64_t n,
                                    int64_t E, int dtype, uintptr_t stream);

void bind_neuron_edit(py::module_& m) {
    m.def(
        "neuron_edit",
        [](uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale, uintptr_t add,
           uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T,
           int64_t N, int64_t n, int64_t E, int dtype, uintptr_t stream) {
            const int st = emk_neuron_edit_cuda(out, a, index, scale, add, row_idx, strength,
                                                pos_mask, B, T, N, n, E, dtype, stream);
            if (st == -1) throw py::value_error("neuron_edit (cuda): unsupported dtype code");
            if (st < 0) throw py::value_error("neuron_edit (cuda): bad sizes");
            if (st > 0)
                throw std::runtime_error(std::string("neuron_edit (cuda): ") +
                                         cudaGetErrorString(static_cast<cudaError_t>(st)));
        },
        py::arg("out"), py::arg("a"), py::arg("index"), py::arg("scale"), py::arg("add"),
        py::arg("row_idx"), py::arg("strength"), py::arg("pos_mask"), py::arg("B"), py::arg("T"),
        py::arg("N"), py::arg("n"), py::arg("E"), py::arg("dtype"), py::arg("stream"),
        "out = a; out[b,t,index[j]] = a[b,t,index[j]]*scale[row_idx[b],j] + "
        "strength[b]*add[row_idx[b],j] where pos_mask[b,t], on raw device pointers, enqueued on "
        "`stream` (scale/add 0 = absent; out == a works in place). See emokernels/ops/neuron_edit.py.");
}
