// Element types and the scalar conversions that define them. The conversions here are the
// reference: CPU casts use them directly and the CUDA kernels are tested against them bit for bit.
// All float encodings round to nearest, ties to even.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__CUDACC__)
#define KV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KV_HOST_DEVICE inline
#endif

namespace kvflash {

enum class DType : uint8_t { F32, F16, BF16, FP8E4M3, I8, U8, I32, I64 };

constexpr DType kAllDTypes[] = {DType::F32, DType::F16,  DType::BF16, DType::FP8E4M3,
                                DType::I8,  DType::U8,   DType::I32,  DType::I64};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::FP8E4M3: return 1;
    case DType::I8: return 1;
    case DType::U8: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::FP8E4M3: return "fp8e4m3";
    case DType::I8: return "i8";
    case DType::U8: return "u8";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
  }
  return "?";
}

inline bool parse_dtype(const std::string& name, DType* out) {
  for (DType t : kAllDTypes) {
    if (name == dtype_name(t)) {
      *out = t;
      return true;
    }
  }
  return false;
}

KV_HOST_DEVICE bool is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::FP8E4M3;
}

KV_HOST_DEVICE uint32_t f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}

KV_HOST_DEVICE float f32_from_bits(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// IEEE binary16. Overflow rounds to infinity; NaN stays a quiet NaN with its sign.
KV_HOST_DEVICE uint16_t f32_to_f16_bits(float x) {
  const uint32_t u = f32_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return sign | 0x7e00u;
  if (mag < 0x38800000u) {  // below 2^-14: a subnormal, in steps of 2^-24
    const float scaled = f32_from_bits(mag) * 16777216.0f;  // exact: a power of two
    return sign | static_cast<uint16_t>(rintf(scaled));
  }
  // Round the 23-bit mantissa to 10 bits (ties to even), then move the exponent bias 127 -> 15.
  const uint32_t rounded = (mag + 0xfffu + ((mag >> 13) & 1u)) >> 13;
  const uint32_t code = rounded - ((127u - 15u) << 10);
  return sign | static_cast<uint16_t>(code >= 0x7c00u ? 0x7c00u : code);
}

KV_HOST_DEVICE float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

// bfloat16: the top half of a float32, rounded. NaN stays a quiet NaN with its sign.
KV_HOST_DEVICE uint16_t f32_to_bf16_bits(float x) {
  const uint32_t u = f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

KV_HOST_DEVICE float bf16_bits_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

// OCP float8 E4M3 ("e4m3fn": bias 7, no infinities, 0x7f/0xff are NaN, largest finite 448).
// Finite values beyond 448 and infinities saturate to +-448, as the KV-cache scales expect;
// NaN stays NaN.
constexpr float kFp8E4M3Max = 448.0f;

KV_HOST_DEVICE uint8_t f32_to_fp8e4m3_bits(float x) {
  const uint32_t u = f32_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return sign | 0x7fu;
  if (mag >= 0x43e00000u) return sign | 0x7eu;  // >= 448
  if (mag < 0x3c800000u) {                      // below 2^-6: a subnormal, in steps of 2^-9
    const float scaled = f32_from_bits(mag) * 512.0f;
    return sign | static_cast<uint8_t>(rintf(scaled));
  }
  const uint32_t rounded = (mag + 0x7ffffu + ((mag >> 20) & 1u)) >> 20;
  const uint32_t code = rounded - ((127u - 7u) << 3);
  return sign | static_cast<uint8_t>(code > 0x7eu ? 0x7eu : code);
}

KV_HOST_DEVICE float fp8e4m3_bits_to_f32(uint8_t c) {
  const uint32_t exp = (c >> 3) & 0xfu;
  const uint32_t man = c & 0x7u;
  float v;
  if (exp == 15 && man == 7) {
    v = f32_from_bits(0x7fc00000u);
  } else if (exp == 0) {
    v = static_cast<float>(man) * 0.001953125f;  // man * 2^-9
  } else {
    v = f32_from_bits(((exp + 120u) << 23) | (man << 20));
  }
  return (c & 0x80u) ? -v : v;
}

}  // namespace kvflash
