// Shared pieces of the CUDA kernels: argument checks, dtype dispatch, float conversions and
// vector loads; the running top-k lists are in topk.cuh.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "topk.cuh"

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace binsparse_cuda {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Host-side argument checks: a bad call through torch.ops raises a RuntimeError naming the
// problem instead of launching a kernel that reads out of bounds.
// ---------------------------------------------------------------------------------------------

// `contiguous`: inputs must be; upstream gradients may have any layout (autograd hands out
// expanded ones) and are made contiguous by the op.
inline void check_cuda(const Tensor& t, const char* name, const Tensor& like, bool contiguous = true) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the other inputs are on ",
              like.device());
  TORCH_CHECK(!contiguous || t.is_contiguous(), name, " must be contiguous");
}

inline void check_float(const Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", s);
}

inline void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_ndim(const Tensor& t, const char* name, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got shape ", t.sizes());
}

// Every index in [0, M). Costs one device sync, so it can be turned off with
// BINSPARSE_CHECK_VALUES=0 (the Python layer checks too); the kernels skip out-of-range indices
// either way, so they never read outside W.
void check_indices_in_range(const Tensor& indices, int64_t M, const char* name);

// Rounding of weights to the compute dtype, as `w.to(compute).float()` does.
enum Round : int { kRoundNone = 0, kRoundBF16 = 1, kRoundHalf = 2 };
inline int round_mode(at::ScalarType weight, at::ScalarType compute) {
  if (compute == at::kFloat || weight == compute) return kRoundNone;
  return compute == at::kBFloat16 ? kRoundBF16 : kRoundHalf;
}

// Dispatch over the three float dtypes, passing a value of the CUDA element type.
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

template <typename T>
inline T* ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// The stream kernels run on: the caller's current stream on the current device.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

inline bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Threads along a row of d columns, 8 columns per thread, a multiple of a warp, at most 256.
inline int row_threads(int64_t d) {
  const int64_t vecs = (d + 7) / 8;
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (vecs + 31) / 32 * 32)));
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float round_to(float v, int mode) {
  if (mode == kRoundBF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (mode == kRoundHalf) return __half2float(__float2half_rn(v));
  return v;
}

// Eight consecutive elements as floats. `vec`: p is 16-byte aligned and all eight are in range
// (one or two 16-byte loads); otherwise the first `n` (<= 8) are loaded one by one, the rest are 0.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8], bool vec, int n) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
      f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      T h[8];
      memcpy(h, &u, 16);
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = to_f(h[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = e < n ? to_f(p[e]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[8], bool vec, int n) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
    } else {
      T h[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) h[e] = from_f<T>(f[e]);
      uint4 u;
      memcpy(&u, h, 16);
      *reinterpret_cast<uint4*>(p) = u;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < n) p[e] = from_f<T>(f[e]);
  }
}

}  // namespace binsparse_cuda
