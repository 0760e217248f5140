// emk_ops.h: the entry points of the native kernels, one entry per op: the CPU function of
// csrc/cpu/<op>.cpp and the CUDA launcher of csrc/cuda/<op>.cu. Math, shapes and dtypes: the
// docstring of emokernels/ops/<op>.py. Bound one m.def each in python_bindings/<kind>_module.cpp.
//
// Every argument is an integer: data pointers (tensor.data_ptr()) and the CUDA stream
// (torch.cuda.current_stream().cuda_stream) as uintptr_t, 0 for an absent optional tensor; sizes
// as int64_t; dtype codes of emk_common.h as int. So no torch or CUDA header is needed to call
// them, and one Python argument list serves both backends (CUDA: the stream last).
//
// Status: 0 = EMK_OK; < 0 = EMK_BAD_DTYPE / EMK_BAD_ARG; > 0 = CPU: an index out of range
// (emk::last_error() says which, nothing was written), CUDA: a cudaError_t of the launch.
#pragma once

#include <cstdint>

// EMK_ENTRY_POINTS(X) calls X(name, args...) once per op: this list declares the CPU function
// emk_<name>_cpu(args) and the CUDA launcher emk_<name>_cuda(args, stream) below, and the module
// files bind both as <name> (adding an op with native kernels is one entry here).
#define EMK_ENTRY_POINTS(X)                                                                        \
    /* out[b,t] = h[b,t] + pos_mask[b,t] * strength[b] * (rms(h[b,t]) if rms_scale) * table[row_idx[b]] */ \
    X(gather_add, uintptr_t out, uintptr_t h, uintptr_t table, uintptr_t row_idx,                  \
      uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T, int64_t d, int64_t E,          \
      int h_dtype, int table_dtype, bool rms_scale, float eps)                                     \
    /* P[b,k] = <h[b,index[b]], directions[k]> (fp32); rows[b] = h[b,index[b]] unless rows == 0 */ \
    X(capture_project, uintptr_t P, uintptr_t rows, uintptr_t h, uintptr_t directions,             \
      uintptr_t index, int64_t B, int64_t T, int64_t d, int64_t K, int h_dtype, int dir_dtype)     \
    /* out = a; out[b,t,index[j]*group + i] = a[..] * scale[row_idx[b],j] + strength[b] * add[row_idx[b],j,i] */ \
    X(sparse_edit, uintptr_t out, uintptr_t a, uintptr_t index, uintptr_t scale, uintptr_t add,    \
      uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask, int64_t B, int64_t T, int64_t N,  \
      int64_t group, int64_t n, int64_t E, int dtype)                                              \
    /* m = residual + delta (+ edit), n = RMSNorm(m) * gamma, P = m[readout] @ dirs^T */           \
    X(fused_add_rmsnorm, uintptr_t m, uintptr_t n, uintptr_t P, uintptr_t residual,                \
      uintptr_t delta, uintptr_t table, uintptr_t row_idx, uintptr_t strength, uintptr_t pos_mask, \
      uintptr_t gamma, uintptr_t dirs, uintptr_t readout, int64_t B, int64_t T, int64_t d,         \
      int64_t E, int64_t K, int dtype, bool table_f32, bool has_edit, bool rms_scale,              \
      bool has_norm, bool gemma, bool has_proj, float eps, float edit_eps)

#define EMK_DECLARE(name, ...)                   \
    int64_t emk_##name##_cpu(__VA_ARGS__);       \
    extern "C" int emk_##name##_cuda(__VA_ARGS__, uintptr_t stream);
EMK_ENTRY_POINTS(EMK_DECLARE)
#undef EMK_DECLARE
