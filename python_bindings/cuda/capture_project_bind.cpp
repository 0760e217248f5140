// pybind11 binding of the CUDA capture_project launcher (csrc/cuda/capture_project.cu).
// Torch-free: device pointers and the stream arrive as integers.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "emk_common.h"

namespace py = pybind11;

extern "C" int emk_capture_project_cuda(float* P, void* rows, const void* h, const void* directions,
                                        const int64_t* index, int64_t B, int64_t T, int64_t d,
                                        int64_t K, int h_dtype, int dir_dtype, cudaStream_t stream);

void bind_capture_project(py::module_& m) {
    m.def(
        "capture_project",
        [](uintptr_t P, uintptr_t rows, uintptr_t h, uintptr_t directions, uintptr_t index,
           int64_t B, int64_t T, int64_t d, int64_t K, int h_dtype, int dir_dtype,
           uintptr_t stream) {
            const int st = emk_capture_project_cuda(
                reinterpret_cast<float*>(P), reinterpret_cast<void*>(rows),
                reinterpret_cast<const void*>(h), reinterpret_cast<const void*>(directions),
                reinterpret_cast<const int64_t*>(index), B, T, d, K, h_dtype, dir_dtype,
                reinterpret_cast<cudaStream_t>(stream));
            if (st == EMK_BAD_DTYPE) throw py::value_error("capture_project (cuda): unsupported dtype code");
            if (st < 0) throw py::value_error("capture_project (cuda): bad argument (need 1 <= K <= 64)");
            if (st > 0)
                throw std::runtime_error(std::string("capture_project (cuda): launch failed: ") +
                                         cudaGetErrorString(static_cast<cudaError_t>(st)));
        },
        py::arg("P"), py::arg("rows"), py::arg("h"), py::arg("directions"), py::arg("index"),
        py::arg("B"), py::arg("T"), py::arg("d"), py::arg("K"), py::arg("h_dtype"),
        py::arg("dir_dtype"), py::arg("stream"));
}
