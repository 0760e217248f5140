// pybind11 module `emokernels_cuda`: CUDA kernels of emokernels.
//
// No torch headers here: every bound function takes raw device pointers as
// uintptr_t (from tensor.data_ptr()), sizes, the dtype enum of
// csrc/include/emk_common.h and the CUDA stream as uintptr_t
// (torch.cuda.current_stream().cuda_stream). The launchers are the
// extern "C" functions of csrc/cuda/<op>.cu. Each op binds its functions in
// python_bindings/cuda/<op>_bind.cpp, which defines `void bind_<op>(pybind11::module_&)`.
#include <pybind11/pybind11.h>

// one line per op: (declarations; neuron_edit/head_edit are already listed here for ops-2.
// emokernels/ops/_build.py stubs a bind_<op> whose python_bindings/<kind>/<op>_bind.cpp
// does not exist yet, with a warning, so the module links while ops are added.)
void bind_gather_add(pybind11::module_&);
void bind_capture_project(pybind11::module_&);
void bind_neuron_edit(pybind11::module_&);
void bind_head_edit(pybind11::module_&);
void bind_fused_residual(pybind11::module_&);

PYBIND11_MODULE(emokernels_cuda, m) {
    m.doc() = "emokernels CUDA kernels (torch-free; raw device pointers + stream)";
    // one line per op:
    bind_gather_add(m);
    bind_capture_project(m);
    bind_neuron_edit(m);
    bind_head_edit(m);
    bind_fused_residual(m);
}
