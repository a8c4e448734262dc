// Quantized KV-cache pages: the formats, their tensor layouts, the scalar quantize / dequantize rules
// (shared by the CPU reference and the CUDA kernels, so both produce the same bytes), and the params
// of the quantization ops. Issue 4 of ../shared/DESIGN.md ("Kernels").
//
// Formats (one per cache layer):
//   fp8e4m3  codes kCodes, vCodes [numPages, P, Hkv, D] u8 (OCP e4m3 bit patterns, dtype.h), and one
//            scale per (page, KV head) for K and for V: kScale, vScale [numPages, Hkv] f16. No mins.
//            The scale is amax / 448 over the page's P x D elements of that head, computed when the
//            page is quantized. Per page rather than one fixed scale per head: a paged cache is
//            quantized a page at a time as it fills, so a page's scale can follow the data without
//            ever re-quantizing older pages, and an outlier token only coarsens its own page.
//   int8, int4, int2 (KIVI, asymmetric, codes 0 .. 2^b - 1):
//            keys per channel over the P tokens of a page:
//              kCodes [numPages, P, Hkv, D*b/8] u8, kScale, kMin [numPages, Hkv, D] f16
//            values per token over groups of G channels (G = 32 default, 64, 128; G divides D):
//              vCodes [numPages, P, Hkv, D*b/8] u8, vScale, vMin [numPages, P, Hkv, D/G] f16
//            Channel d's code sits in byte d*b/8 of its row at bit (d*b) % 8: least-significant bits
//            first (channel 0 of an int4 row is the low nibble of byte 0).
//
// Scales and mins are stored as f16. Why f16 rather than f32: the metadata is a large share of a
// low-bit page (int2 with P = 16: the key stats are 2 x 16 bits per channel per page, 2 bits per key
// element in f16 but 4 in f32, as much as the codes themselves), and decode reads all of it, so f32
// would cost int2 a third of its bandwidth saving. The f16 rounding does not weaken the error bound,
// because the stored values are chosen by directed rounding and the codes are computed from the
// stored (rounded) values:
//   min_r = f16 rounded DOWN from the group's min, so no element lies below it;
//   s_r   = f16 rounded UP from (max - min_r) / (2^b - 1), so min_r + (2^b - 1) s_r >= max;
//   code  = clamp(rint((x - min_r) / s_r), 0, 2^b - 1), and x^ = fma(code, s_r, min_r).
// Every element of [min_r, min_r + (2^b - 1) s_r] is then within s_r / 2 of its reconstruction (up to
// float32 rounding of the subtraction and division), with s_r the stored scale. f16 bounds the values
// a cache can hold to |x| <= 65504 (see sanitize below), which bf16 activations of real models respect.
//
// Rounding: rint (to nearest, ties to even) for codes; IEEE division (not a reciprocal), so the CUDA
// kernels (built without fast math) produce the same codes bit for bit.
//
// Non-finite input has a defined result (documented saturation, no host check, since the GPU pages
// are never read on the host): NaN quantizes as 0, +-inf and finite values beyond +-65504 as +-65504.
// A constant group (max == min) gets s_r = 0 when its value is an f16 number: every code is 0 and it
// reconstructs exactly, with no division by zero (a zero scale gives code 0); otherwise s_r is the
// tiny positive step that covers the rounding of min. No NaN can come out of a quantized page.
//
// The full-precision tail (the KIVI residual, aligned to pages): the last page of every sequence is
// NOT quantized. quantizedPagedDecode and quantizedPagedPrefill take the table of the whole sequence: indices[indptr[b] ..
// indptr[b+1] - 2] name quantized pages (< numPages of the codes), and the LAST index of each
// sequence names a page of a full-precision tail pool kTail, vTail [numTail, P, Hkv, D] (q's dtype,
// < numTail), holding lastPageLen[b] tokens. Appending writes the tail with appendPagedKV; when a
// tail page is full and the next token arrives, the cache manager quantizes it into a fresh
// quantized page (quantizePages) and starts a new tail page. A whole page is quantized at once, so
// appending token by token gives the same bytes as quantizing the page in one go.
#pragma once
#include <cstdint>

#include "attention_params.h"
#include "dtype.h"

namespace kvflash {

enum class QuantFormat : uint8_t { FP8E4M3, INT8, INT4, INT2 };

inline const char* quant_format_name(QuantFormat f) {
  switch (f) {
    case QuantFormat::FP8E4M3: return "fp8e4m3";
    case QuantFormat::INT8: return "int8";
    case QuantFormat::INT4: return "int4";
    case QuantFormat::INT2: return "int2";
  }
  return "?";
}

// Code bits per element (fp8 is 8 bits of e4m3, not an integer code).
KV_HOST_DEVICE int quant_bits(QuantFormat f) {
  return f == QuantFormat::INT4 ? 4 : f == QuantFormat::INT2 ? 2 : 8;
}

constexpr int kDefaultValueGroup = 32;
constexpr float kQuantInputMax = 65504.0f;  // the largest f16: the range of a quantized cache

// One layer's quantized pages. Pointers are on the op's device; mins are null for fp8.
struct QuantizedPages {
  QuantFormat format = QuantFormat::INT4;
  int num_pages = 0;
  int page_size = 0;     // P
  int num_kv_heads = 0;  // Hkv
  int head_dim = 0;      // D
  int group_size = kDefaultValueGroup;  // G, for the values of the integer formats
  void* k_codes = nullptr;  // [numPages, P, Hkv, row_bytes()]
  void* v_codes = nullptr;
  uint16_t* k_scale = nullptr;  // f16 bits; integer: [numPages, Hkv, D]; fp8: [numPages, Hkv]
  uint16_t* k_min = nullptr;    // integer only: [numPages, Hkv, D]
  uint16_t* v_scale = nullptr;  // integer: [numPages, P, Hkv, D/G]; fp8: [numPages, Hkv]
  uint16_t* v_min = nullptr;    // integer only: [numPages, P, Hkv, D/G]

  KV_HOST_DEVICE int bits() const { return quant_bits(format); }
  KV_HOST_DEVICE int row_bytes() const { return head_dim * bits() / 8; }  // one token, one head
  KV_HOST_DEVICE int groups() const { return head_dim / group_size; }
};

// Source pages src_pages[i] of a full-precision pool (k_src, v_src [numSrc, P, Hkv, D] of `dtype`)
// quantized into pages dst_pages[i] of `dst`.
struct QuantizeParams {
  DType dtype = DType::BF16;
  int count = 0;
  const void* k_src = nullptr;
  const void* v_src = nullptr;
  const int32_t* src_pages = nullptr;  // [count], on the device
  const int32_t* dst_pages = nullptr;
  const int32_t* src_pages_host = nullptr;
  const int32_t* dst_pages_host = nullptr;
  QuantizedPages dst;
};

// Pages pages[i] of `src` reconstructed into k_out, v_out [count, P, Hkv, D] of `dtype`.
struct DequantizeParams {
  DType dtype = DType::F32;
  int count = 0;
  QuantizedPages src;
  const int32_t* pages = nullptr;  // [count], on the device
  const int32_t* pages_host = nullptr;
  void* k_out = nullptr;
  void* v_out = nullptr;
};

// Paged decode over a quantized layer: kv.k_pages / kv.v_pages are the full-precision TAIL pool
// (kv.num_pages = numTail pages) that the last index of each sequence names; every other index
// names a page of `quant`. q, out [B, H, D] of `dtype` (the tail's dtype too).
struct QuantDecodeParams {
  DType dtype = DType::BF16;
  AttentionShape shape;
  float scale = 1.0f;
  int batch = 0;
  int max_pages_per_seq = 0;
  const void* q = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // may be null
  QuantizedPages quant;
  PagedKV kv;
};

// Paged prefill over a quantized layer: the PagedPrefillParams of a paged prefill (queries ragged by
// cu_seqlens_q, aligned to the end of their sequence) whose kv pool is the full-precision TAIL pool,
// as in QuantDecodeParams; every index but the last of a sequence names a page of `quant`.
struct QuantPrefillParams : PagedPrefillParams {
  QuantizedPages quant;
};

// ---- the scalar rules ------------------------------------------------------------------------

// What a quantized cache stores for x: NaN as 0, beyond the f16 range (infinities too) saturated.
KV_HOST_DEVICE float quant_sanitize(float x) {
  if (x != x) return 0.0f;
  return x > kQuantInputMax ? kQuantInputMax : (x < -kQuantInputMax ? -kQuantInputMax : x);
}

// The f16 nearest to finite x (|x| <= 65504) on the side of -inf (down) or +inf (up).
KV_HOST_DEVICE uint16_t f16_bits_round_down(float x) {
  uint16_t h = f32_to_f16_bits(x);
  if (f16_bits_to_f32(h) > x) h = (h & 0x8000u) ? static_cast<uint16_t>(h + 1) : (h == 0 ? 0x8001u : h - 1);
  return h;
}
KV_HOST_DEVICE uint16_t f16_bits_round_up(float x) {
  uint16_t h = f32_to_f16_bits(x);
  if (f16_bits_to_f32(h) < x) {
    h = (h & 0x8000u) ? ((h & 0x7fffu) == 0 ? 0x0001u : static_cast<uint16_t>(h - 1)) : static_cast<uint16_t>(h + 1);
  }
  return h;
}

// Scale and min (f16 bits) of an integer group whose sanitized values span [lo, hi].
struct AffineBits {
  uint16_t scale, min;
};
KV_HOST_DEVICE AffineBits affine_for_range(float lo, float hi, int levels) {
  AffineBits a;
  a.min = f16_bits_round_down(lo);
  const float step = (hi - f16_bits_to_f32(a.min)) / static_cast<float>(levels);
  a.scale = f16_bits_round_up(step > 0.0f ? step : 0.0f);
  return a;
}

// The code (0 .. levels) of sanitized x under stored scale and min.
KV_HOST_DEVICE uint32_t quantize_int(float x, float scale, float min, int levels) {
  if (!(scale > 0.0f)) return 0;
  const float q = rintf((x - min) / scale);
  return q <= 0.0f ? 0u : (q >= static_cast<float>(levels) ? static_cast<uint32_t>(levels) : static_cast<uint32_t>(q));
}

KV_HOST_DEVICE float dequantize_int(uint32_t code, float scale, float min) {
  return fmaf(static_cast<float>(code), scale, min);
}

// fp8: the per-(page, head) scale (f16 bits) for a block whose largest sanitized |x| is amax.
KV_HOST_DEVICE uint16_t fp8_scale_for_amax(float amax) { return f16_bits_round_up(amax / kFp8E4M3Max); }

KV_HOST_DEVICE uint8_t quantize_fp8(float x, float scale) {
  // x / scale <= 448 by the round-up of the scale; the encoder saturates anyway.
  return scale > 0.0f ? f32_to_fp8e4m3_bits(x / scale) : 0;
}

KV_HOST_DEVICE float dequantize_fp8(uint8_t code, float scale) { return fp8e4m3_bits_to_f32(code) * scale; }

// Channel d's code in a packed row (LSB first).
KV_HOST_DEVICE uint32_t unpack_code(const uint8_t* row, int d, int bits) {
  const int bit = d * bits;
  return (static_cast<uint32_t>(row[bit >> 3]) >> (bit & 7)) & ((1u << bits) - 1u);
}

}  // namespace kvflash
