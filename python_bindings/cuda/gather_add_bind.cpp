// pybind11 binding of the CUDA gather_add launcher (csrc/cuda/gather_add.cu). Torch-free:
// device pointers and the stream arrive as integers (tensor.data_ptr(), stream.cuda_stream).
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "emk_common.h"

namespace py = pybind11;

extern "C" int emk_gather_add_cuda(void* out, const void* h, const void* table,
                                   const int64_t* row_idx, const float* strength,
                                   const bool* pos_mask, int64_t B, int64_t T, int64_t d,
                                   int64_t E, int h_dtype, int table_dtype, bool rms_scale,
                                   float eps, cudaStream_t stream);

void bind_gather_add(py::module_& m) {
    m.def(
        "gather_add",
        [](uintptr_t out, uintptr_t h, uintptr_t table, uintptr_t row_idx, uintptr_t strength,
           uintptr_t pos_mask, int64_t B, int64_t T, int64_t d, int64_t E, int h_dtype,
           int table_dtype, bool rms_scale, float eps, uintptr_t stream) {
            const int st = emk_gather_add_cuda(
                reinterpret_cast<void*>(out), reinterpret_cast<const void*>(h),
                reinterpret_cast<const void*>(table), reinterpret_cast<const int64_t*>(row_idx),
                reinterpret_cast<const float*>(strength), reinterpret_cast<const bool*>(pos_mask),
                B, T, d, E, h_dtype, table_dtype, rms_scale, eps,
                reinterpret_cast<cudaStream_t>(stream));
            if (st == EMK_BAD_DTYPE) throw py::value_error("gather_add (cuda): unsupported dtype code");
            if (st < 0) throw py::value_error("gather_add (cuda): bad argument (too many rows)");
            if (st > 0)
                throw std::runtime_error(std::string("gather_add (cuda): launch failed: ") +
                                         cudaGetErrorString(static_cast<cudaError_t>(st)));
        },
        py::arg("out"), py::arg("h"), py::arg("table"), py::arg("row_idx"), py::arg("strength"),
        py::arg("pos_mask"), py::arg("B"), py::arg("T"), py::arg("d"), py::arg("E"),
        py::arg("h_dtype"), py::arg("table_dtype"), py::arg("rms_scale"), py::arg("eps"),
        py::arg("stream"));
}
