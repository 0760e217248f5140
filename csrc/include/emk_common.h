// emk_common.h: shared definitions for the emokernels native kernels (CPU and CUDA).
//
// No torch headers. Tensors cross the boundary as raw pointers plus a dtype enum:
//
//   EMK_F32 = 0   float
//   EMK_F16 = 1   IEEE half, stored as uint16_t on the CPU side
//   EMK_BF16 = 2  bfloat16, stored as uint16_t on the CPU side
//
// The Python side maps torch dtypes to these numbers (emokernels/ops/backends.py,
// DTYPE_CODE). Every kernel accumulates in fp32 and rounds to the storage type with
// round-to-nearest-even, as torch does.
//
// CPU helpers (host-only, this header is also included by .cu files for the enum):
//   emk::load<T>(ptr, i)   -> float
//   emk::store<T>(ptr, i, float)
// with T one of float / emk::half_t / emk::bf16_t (tag types over uint16_t), and
// EMK_DISPATCH_DTYPE(code, T, ...) to instantiate a body for each storage type.
// emk::range_error(...) records why a CPU entry point refused its arguments (the bindings raise
// IndexError with that text).
//
// CUDA helpers (device code, .cu files): emk::Cvt<T>::ld / st / rnd for T one of float / __half /
// __nv_bfloat16, and EMK_CUDA_DISPATCH_DTYPE(code, T, ...).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

enum EmkDtype : int { EMK_F32 = 0, EMK_F16 = 1, EMK_BF16 = 2 };

// Status codes returned by the CUDA launchers and some CPU entry points.
enum EmkStatus : int { EMK_OK = 0, EMK_BAD_DTYPE = -1, EMK_BAD_ARG = -2 };

#ifndef __CUDACC__
namespace emk {

// 16-bit storage tags: distinct types so templates can tell fp16 from bf16.
struct half_t { uint16_t x; };
struct bf16_t { uint16_t x; };
static_assert(sizeof(half_t) == 2 && sizeof(bf16_t) == 2, "16-bit storage");

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// bfloat16 <-> float (round to nearest even; NaN stays a quiet NaN).
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// IEEE half <-> float (after F. Giesen's public-domain half_to_float / float_to_half_fast3_rtne).
inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;
    const uint32_t exp = shifted_exp & o;
    o += (127u - 15u) << 23;
    if (exp == shifted_exp) {            // inf / NaN
        o += (128u - 16u) << 23;
    } else if (exp == 0) {               // zero / subnormal: renormalise through the FPU
        o += 1u << 23;
        o = f32_bits(bits_f32(o) - bits_f32(113u << 23));
    }
    return bits_f32(o | sign);
}
inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint32_t o;
    if (x >= 0x47800000u) {              // >= 65536 (or inf/NaN): inf, or quiet NaN
        o = (x > 0x7f800000u) ? 0x7e00u : 0x7c00u;
    } else if (x < 0x38800000u) {        // < 2^-14: subnormal half (or zero); FPU rounds (RNE)
        const float magic = bits_f32(126u << 23);
        o = f32_bits(bits_f32(x) + magic) - f32_bits(magic);
    } else {                             // normal: rebias exponent, round mantissa to nearest even
        const uint32_t mant_odd = (x >> 13) & 1u;
        x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
        x += mant_odd;
        o = x >> 13;                     // a carry into exponent 31 gives inf, as it should
    }
    return static_cast<uint16_t>(o | (sign >> 16));
}

template <typename T> inline float load(const T* p, int64_t i);
template <> inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load<half_t>(const half_t* p, int64_t i) { return f16_to_f32(p[i].x); }
template <> inline float load<bf16_t>(const bf16_t* p, int64_t i) { return bf16_to_f32(p[i].x); }

template <typename T> inline void store(T* p, int64_t i, float v);
template <> inline void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void store<half_t>(half_t* p, int64_t i, float v) { p[i].x = f32_to_f16(v); }
template <> inline void store<bf16_t>(bf16_t* p, int64_t i, float v) { p[i].x = f32_to_bf16(v); }

template <typename T> inline const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T> inline T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Work (elements touched) below which a kernel runs on the calling thread: an OpenMP fork/join
// costs a few microseconds, more than a decode-sized (T=1, d<=4096) edit.
constexpr int64_t kParallelMinWork = 1 << 16;

// The text of the last refused call on this thread (read by python_bindings/cpu_module.cpp).
inline std::string& last_error() {
    static thread_local std::string msg;
    return msg;
}

// Records "<what>[<pos>] is outside [0, <bound_name>=<bound>)" and returns 1: the status with
// which a CPU entry point refuses an out-of-range index before writing anything.
inline int64_t range_error(const char* what, int64_t pos, const char* bound_name, int64_t bound) {
    last_error() = std::string(what) + "[" + std::to_string(pos) + "] is outside [0, " + bound_name +
                   "=" + std::to_string(bound) + ")";
    return 1;
}

// The first b < B with idx[b] outside [0, bound), or -1.
inline int64_t first_out_of_range(const int64_t* idx, int64_t B, int64_t bound) {
    for (int64_t b = 0; b < B; ++b)
        if (idx[b] < 0 || idx[b] >= bound) return b;
    return -1;
}

}  // namespace emk

// EMK_DISPATCH_DTYPE(code, T, body...): runs body with `T` bound to the storage type of `code`;
// returns EMK_BAD_DTYPE from the enclosing function for an unknown code.
#define EMK_DISPATCH_DTYPE(code, T, ...)                         \
    switch (code) {                                              \
        case EMK_F32: { using T = float; __VA_ARGS__; break; }   \
        case EMK_F16: { using T = emk::half_t; __VA_ARGS__; break; } \
        case EMK_BF16: { using T = emk::bf16_t; __VA_ARGS__; break; } \
        default: return EMK_BAD_DTYPE;                           \
    }
#endif  // !__CUDACC__

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace emk {

// fp32 <-> storage type on the device; rnd(v) rounds v to the storage type and back (the
// rounding of an intermediate that HF keeps in the activation dtype).
template <typename T> struct Cvt;
template <> struct Cvt<float> {
    __device__ __forceinline__ static float ld(const float* p, int64_t i) { return p[i]; }
    __device__ __forceinline__ static void st(float* p, int64_t i, float v) { p[i] = v; }
    __device__ __forceinline__ static float rnd(float v) { return v; }
};
template <> struct Cvt<__half> {
    __device__ __forceinline__ static float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
    __device__ __forceinline__ static void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
    __device__ __forceinline__ static float rnd(float v) { return __half2float(__float2half_rn(v)); }
};
template <> struct Cvt<__nv_bfloat16> {
    __device__ __forceinline__ static float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
    __device__ __forceinline__ static void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
    __device__ __forceinline__ static float rnd(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

}  // namespace emk

// EMK_CUDA_DISPATCH_DTYPE(code, T, body...): body with `T` the device storage type of `code`;
// returns EMK_BAD_DTYPE from the enclosing function for an unknown code.
#define EMK_CUDA_DISPATCH_DTYPE(code, T, ...)                          \
    switch (code) {                                                    \
        case EMK_F32: { using T = float; __VA_ARGS__; break; }         \
        case EMK_F16: { using T = __half; __VA_ARGS__; break; }        \
        case EMK_BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
        default: return EMK_BAD_DTYPE;                                 \
    }
#endif  // __CUDACC__
