// Quantized codes and statistics to floats in registers, exactly as the scalar rules of
// native/core/quant_format.h define them (dequantize_int's fma and dequantize_fp8's product then
// give the CPU reference's values bit for bit). Shared by the fused quantized attention kernels
// (decode_quant.cu, prefill_quant.cu); included by .cu files only.
#pragma once
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace kvflash::cuda {
namespace {

// Two f16 (the low and high halves of w) as floats, by the hardware conversion (exact).
__device__ __forceinline__ float2 f16x2_to_float(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}

// Two e4m3 codes (the low 16 bits of w) as floats: exact through f16, NaN stays NaN, as
// fp8e4m3_bits_to_f32 defines; one conversion instruction on sm_89 and newer.
__device__ __forceinline__ float2 fp8x2_to_float(uint32_t w) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  __half2 h;
  memcpy(&h, &raw, 4);
  return __half22float2(h);
}

// Float of a small unsigned integer code without the (quarter-rate) int-to-float unit: the code
// as the low mantissa bits of 2^23, minus 2^23 (exact).
__device__ __forceinline__ float code_to_float(uint32_t c) { return __uint_as_float(0x4b000000u | c) - 8388608.f; }

}  // namespace
}  // namespace kvflash::cuda
