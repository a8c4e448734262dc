// Reading and writing one element of any dtype as a float or an integer, on host and device. The
// reference kernels read as plain float arithmetic through these, and the CUDA cast uses the same
// definitions, so both backends agree bit for bit.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace kvflash {

// Float to integer: toward zero, saturating at [lo, hi], NaN to 0.
KV_HOST_DEVICE int64_t saturate(double v, double lo, double hi) {
  if (v != v) return 0;
  if (v <= lo) return static_cast<int64_t>(lo);
  if (v >= hi) return static_cast<int64_t>(hi);
  return static_cast<int64_t>(v);
}

KV_HOST_DEVICE int64_t saturate_int(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

KV_HOST_DEVICE float load_float(DType t, const void* base, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::F16: return f16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::BF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::FP8E4M3: return fp8e4m3_bits_to_f32(static_cast<const uint8_t*>(base)[i]);
    case DType::I8: return static_cast<const int8_t*>(base)[i];
    case DType::U8: return static_cast<const uint8_t*>(base)[i];
    case DType::I32: return static_cast<float>(static_cast<const int32_t*>(base)[i]);
    case DType::I64: return static_cast<float>(static_cast<const int64_t*>(base)[i]);
  }
  return 0.0f;
}

KV_HOST_DEVICE int64_t load_int(DType t, const void* base, int64_t i) {
  switch (t) {
    case DType::I8: return static_cast<const int8_t*>(base)[i];
    case DType::U8: return static_cast<const uint8_t*>(base)[i];
    case DType::I32: return static_cast<const int32_t*>(base)[i];
    case DType::I64: return static_cast<const int64_t*>(base)[i];
    default: return saturate(load_float(t, base, i), -9.2233720368547758e18, 9.2233720368547748e18);
  }
}

KV_HOST_DEVICE void store_float(DType t, void* base, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(base)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(base)[i] = f32_to_f16_bits(v); break;
    case DType::BF16: static_cast<uint16_t*>(base)[i] = f32_to_bf16_bits(v); break;
    case DType::FP8E4M3: static_cast<uint8_t*>(base)[i] = f32_to_fp8e4m3_bits(v); break;
    case DType::I8: static_cast<int8_t*>(base)[i] = static_cast<int8_t>(saturate(v, -128.0, 127.0)); break;
    case DType::U8: static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(saturate(v, 0.0, 255.0)); break;
    case DType::I32:
      static_cast<int32_t*>(base)[i] = static_cast<int32_t>(saturate(v, -2147483648.0, 2147483647.0));
      break;
    case DType::I64:
      static_cast<int64_t*>(base)[i] = saturate(v, -9.2233720368547758e18, 9.2233720368547748e18);
      break;
  }
}

KV_HOST_DEVICE void store_int(DType t, void* base, int64_t i, int64_t v) {
  switch (t) {
    case DType::I8: static_cast<int8_t*>(base)[i] = static_cast<int8_t>(saturate_int(v, -128, 127)); break;
    case DType::U8: static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(saturate_int(v, 0, 255)); break;
    case DType::I32:
      static_cast<int32_t*>(base)[i] = static_cast<int32_t>(saturate_int(v, -2147483648LL, 2147483647LL));
      break;
    case DType::I64: static_cast<int64_t*>(base)[i] = v; break;
    default: store_float(t, base, i, static_cast<float>(v)); break;
  }
}

// Casts element i: float sources go through float32, integer sources through int64.
KV_HOST_DEVICE void cast_element(DType from, const void* src, DType to, void* dst, int64_t i) {
  if (is_float(from)) {
    store_float(to, dst, i, load_float(from, src, i));
  } else {
    store_int(to, dst, i, load_int(from, src, i));
  }
}

}  // namespace kvflash

namespace kvflash {

// The bytes of one element holding `value`, by the cast rules above (fills replicate them).
inline void encode_scalar(DType t, double value, void* out) {
  if (is_float(t)) {
    store_float(t, out, 0, static_cast<float>(value));
  } else {
    store_int(t, out, 0, saturate(value, -9.2233720368547758e18, 9.2233720368547748e18));
  }
}

}  // namespace kvflash
