// Device helpers shared by quantkit's CUDA kernels: element loads with conversion to the accumulation type,
// the (score, index) order every selection uses, and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launchers.h"

namespace quantkit {
namespace cuda {

constexpr int kWarp = 32;

// Accumulation type of an element type: float64 stays float64 (so gradcheck works), the rest accumulate in float32.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename Acc, typename T> __device__ __forceinline__ Acc load_as(const T* p) { return static_cast<Acc>(*p); }
template <> __device__ __forceinline__ float load_as<float, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T, typename Acc> __device__ __forceinline__ T store_as(Acc v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store_as<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename Acc> __device__ __forceinline__ Acc neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -static_cast<double>(INFINITY); }

// The one order every selection uses: a larger score is nearer; equal scores go to the lower index.
// It is a strict total order on (score, index) pairs with distinct indices, so any reduction tree gives the
// same winner: this is what makes ties deterministic for any launch shape.
template <typename Acc>
__device__ __forceinline__ bool nearer(Acc score_a, int index_a, Acc score_b, int index_b) {
  return score_a > score_b || (score_a == score_b && index_a < index_b);
}

template <typename Acc> __device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename Acc> __device__ __forceinline__ Acc warp_max(Acc v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Runs f.template operator()<T>() with T the element type for dtype.
template <typename F> cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace quantkit
