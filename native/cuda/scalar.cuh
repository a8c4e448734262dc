// Element conversions and warp reductions shared by the small kernels (Quest, attention mass).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/dtype.h"

namespace kvflash::cuda {

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }

// The sum over the warp, in every lane.
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Calls f with a value of the CUDA element type of `dtype` (bf16, else f16: what the binding allows).
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  if (dtype == DType::BF16) {
    f(__nv_bfloat16{});
  } else {
    f(__half{});
  }
}

}  // namespace kvflash::cuda
