// pybind11 module `emokernels_cuda`: the CUDA launchers, one m.def per entry point of
// csrc/include/emk_ops.h. Torch-free: device pointers, sizes, dtype codes and the stream
// (torch.cuda.current_stream().cuda_stream) arrive as integers.
//
// Launches are asynchronous (no host sync). A refused call raises here: ValueError for an unknown
// dtype or sizes beyond the kernel (status < 0), RuntimeError for a failed launch (a cudaError_t).
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "emk_common.h"
#include "emk_ops.h"

namespace py = pybind11;

namespace {

// The Python function of one CUDA launcher: same integer arguments, GIL released, status -> error.
template <typename... Args>
auto entry(const char* name, int (*fn)(Args...)) {
    return [name, fn](Args... args) {
        int status;
        {
            py::gil_scoped_release nogil;
            status = fn(args...);
        }
        if (status == EMK_BAD_DTYPE) throw py::value_error(std::string(name) + " (cuda): unsupported dtype code");
        if (status < 0) throw py::value_error(std::string(name) + " (cuda): bad argument (sizes beyond the kernel's limits)");
        if (status > 0)
            throw std::runtime_error(std::string(name) + " (cuda): launch failed: " +
                                     cudaGetErrorString(static_cast<cudaError_t>(status)));
    };
}

}  // namespace

#define EMK_BIND(name, ...) m.def(#name, entry(#name, &emk_##name##_cuda));

PYBIND11_MODULE(emokernels_cuda, m) {
    m.doc() = "emokernels CUDA kernels (torch-free; raw device pointers + stream). See csrc/include/emk_ops.h.";
    EMK_ENTRY_POINTS(EMK_BIND)  // one m.def per entry point of emk_ops.h
}
