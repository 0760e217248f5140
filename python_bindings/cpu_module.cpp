// pybind11 module `emokernels_cpu`: the CPU (OpenMP) kernels, one m.def per entry point of
// csrc/include/emk_ops.h. Torch-free: pointers, sizes and dtype codes arrive as integers.
//
// Every entry runs without the GIL. A refused call raises here: IndexError for an index out of
// range (status > 0, the kernel's message), ValueError for an unknown dtype or a bad size (< 0).
#include <pybind11/pybind11.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "emk_common.h"
#include "emk_ops.h"

namespace py = pybind11;

namespace {

// The Python function of one CPU entry point: same integer arguments, GIL released, status -> error.
template <typename... Args>
auto entry(const char* name, int64_t (*fn)(Args...)) {
    return [name, fn](Args... args) {
        int64_t status;
        {
            py::gil_scoped_release nogil;
            status = fn(args...);
        }
        if (status > 0) throw py::index_error(std::string(name) + ": " + emk::last_error());
        if (status == EMK_BAD_DTYPE) throw py::value_error(std::string(name) + ": unsupported dtype code");
        if (status < 0) throw py::value_error(std::string(name) + ": bad argument");
    };
}

}  // namespace

#define EMK_BIND(name, ...) m.def(#name, entry(#name, &emk_##name##_cpu));

PYBIND11_MODULE(emokernels_cpu, m) {
    m.doc() = "emokernels CPU kernels (OpenMP, torch-free; raw pointers). See csrc/include/emk_ops.h.";
    m.def("num_threads", []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    });
    EMK_ENTRY_POINTS(EMK_BIND)  // one m.def per entry point of emk_ops.h
}
