// pybind11 module `emokernels_cpu`: CPU (OpenMP) kernels of emokernels.
//
// No torch headers here: every bound function takes raw data pointers as
// uintptr_t (from tensor.data_ptr()), sizes and the dtype enum of
// csrc/include/emk_common.h. Each op binds its functions in
// python_bindings/cpu/<op>_bind.cpp, which defines `void bind_<op>(pybind11::module_&)`.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// one line per op: (declarations; neuron_edit/head_edit are already listed here for ops-2.
// emokernels/ops/_build.py stubs a bind_<op> whose python_bindings/<kind>/<op>_bind.cpp
// does not exist yet, with a warning, so the module links while ops are added.)
void bind_gather_add(pybind11::module_&);
void bind_capture_project(pybind11::module_&);
void bind_neuron_edit(pybind11::module_&);
void bind_head_edit(pybind11::module_&);
void bind_fused_residual(pybind11::module_&);

PYBIND11_MODULE(emokernels_cpu, m) {
    m.doc() = "emokernels CPU kernels (OpenMP, torch-free; raw pointers)";
    m.def("num_threads", []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    });
    // one line per op:
    bind_gather_add(m);
    bind_capture_project(m);
    bind_neuron_edit(m);
    bind_head_edit(m);
    bind_fused_residual(m);
}
