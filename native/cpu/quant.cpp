#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../core/element_access.h"
#include "attention.h"

namespace kvflash::cpu {
namespace {

int64_t row_index(const QuantizedPages& q, int64_t page, int slot, int head) {
  return (page * q.page_size + slot) * q.num_kv_heads + head;
}

uint8_t* code_row(const QuantizedPages& q, void* codes, int64_t page, int slot, int head) {
  return static_cast<uint8_t*>(codes) + row_index(q, page, slot, head) * q.row_bytes();
}

void put_code(uint8_t* row, int d, int bits, uint32_t code) {
  const int bit = d * bits;
  row[bit >> 3] = static_cast<uint8_t>(row[bit >> 3] | (code << (bit & 7)));
}

// One tensor (K or V) of page `dst` from `src_elem(slot, head, d)`, the sanitized source values.
template <typename Src>  // Src: (slot, head, d) -> float, already sanitized
void quantize_tensor(QuantizedPages& q, bool keys, int64_t dst, Src src_elem) {
  const int P = q.page_size, D = q.head_dim, bits = q.bits(), levels = (1 << bits) - 1;
  void* codes = keys ? q.k_codes : q.v_codes;
  uint16_t* scales = keys ? q.k_scale : q.v_scale;
  uint16_t* mins = keys ? q.k_min : q.v_min;
  for (int h = 0; h < q.num_kv_heads; ++h) {
    if (q.format == QuantFormat::FP8E4M3) {
      float amax = 0.0f;
      for (int t = 0; t < P; ++t)
        for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(src_elem(t, h, d)));
      const uint16_t sb = fp8_scale_for_amax(amax);
      scales[dst * q.num_kv_heads + h] = sb;
      const float s = f16_bits_to_f32(sb);
      for (int t = 0; t < P; ++t) {
        uint8_t* row = code_row(q, codes, dst, t, h);
        for (int d = 0; d < D; ++d) row[d] = quantize_fp8(src_elem(t, h, d), s);
      }
      continue;
    }
    for (int t = 0; t < P; ++t) std::memset(code_row(q, codes, dst, t, h), 0, q.row_bytes());
    if (keys) {  // per channel over the page's tokens
      for (int d = 0; d < D; ++d) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        for (int t = 0; t < P; ++t) {
          lo = std::min(lo, src_elem(t, h, d));
          hi = std::max(hi, src_elem(t, h, d));
        }
        const AffineBits a = affine_for_range(lo, hi, levels);
        const int64_t at = (dst * q.num_kv_heads + h) * D + d;
        scales[at] = a.scale;
        mins[at] = a.min;
        const float s = f16_bits_to_f32(a.scale), m = f16_bits_to_f32(a.min);
        for (int t = 0; t < P; ++t) put_code(code_row(q, codes, dst, t, h), d, bits, quantize_int(src_elem(t, h, d), s, m, levels));
      }
    } else {  // per token over groups of channels
      const int G = q.group_size;
      for (int t = 0; t < P; ++t) {
        uint8_t* row = code_row(q, codes, dst, t, h);
        for (int g = 0; g < q.groups(); ++g) {
          float lo = std::numeric_limits<float>::infinity(), hi = -lo;
          for (int d = g * G; d < (g + 1) * G; ++d) {
            lo = std::min(lo, src_elem(t, h, d));
            hi = std::max(hi, src_elem(t, h, d));
          }
          const AffineBits a = affine_for_range(lo, hi, levels);
          const int64_t at = row_index(q, dst, t, h) * q.groups() + g;
          scales[at] = a.scale;
          mins[at] = a.min;
          const float s = f16_bits_to_f32(a.scale), m = f16_bits_to_f32(a.min);
          for (int d = g * G; d < (g + 1) * G; ++d) put_code(row, d, bits, quantize_int(src_elem(t, h, d), s, m, levels));
        }
      }
    }
  }
}

// Element (slot, head, d) of page `page`, reconstructed.
float key_at(const QuantizedPages& q, int64_t page, int slot, int head, int d) {
  const uint8_t* row = code_row(q, q.k_codes, page, slot, head);
  if (q.format == QuantFormat::FP8E4M3) return dequantize_fp8(row[d], f16_bits_to_f32(q.k_scale[page * q.num_kv_heads + head]));
  const int64_t at = (page * q.num_kv_heads + head) * q.head_dim + d;
  return dequantize_int(unpack_code(row, d, q.bits()), f16_bits_to_f32(q.k_scale[at]), f16_bits_to_f32(q.k_min[at]));
}

float value_at(const QuantizedPages& q, int64_t page, int slot, int head, int d) {
  const uint8_t* row = code_row(q, q.v_codes, page, slot, head);
  if (q.format == QuantFormat::FP8E4M3) return dequantize_fp8(row[d], f16_bits_to_f32(q.v_scale[page * q.num_kv_heads + head]));
  const int64_t at = row_index(q, page, slot, head) * q.groups() + d / q.group_size;
  return dequantize_int(unpack_code(row, d, q.bits()), f16_bits_to_f32(q.v_scale[at]), f16_bits_to_f32(q.v_min[at]));
}

// Rows of one (sequence, KV head) of a quantized layer for the shared attention routine: a row of a
// quantized page comes from a buffer of that page's P rows, dequantized to the op's dtype (as
// dequantizePages writes them) when a row of the page is first asked for; the last page of the sequence
// is read from the full-precision tail pool.
KeyValueRows quantized_rows(const QuantPrefillParams& p, int b, int kv_head) {
  const QuantizedPages& q = p.quant;
  const int P = q.page_size, D = q.head_dim;
  const size_t row_size = dtype_size(p.dtype) * D;
  const int32_t* pages = p.kv.indices_host + p.kv.indptr_host[b];
  const int tail = p.kv.indptr_host[b + 1] - p.kv.indptr_host[b] - 1;  // the tail's place in the sequence
  auto reader = [=, &p](bool keys) {
    struct PageBuffer {
      int page = -1;  // place in the sequence of the page held
      std::vector<char> rows;
    };
    auto held = std::make_shared<PageBuffer>();
    held->rows.resize(P * row_size);
    return [=, &p](int j) -> const void* {
      const int i = j / P, slot = j % P;
      const int64_t page = pages[i];
      if (i == tail) {
        const void* pool = keys ? p.kv.k_pages : p.kv.v_pages;
        return static_cast<const char*>(pool) + ((page * P + slot) * q.num_kv_heads + kv_head) * row_size;
      }
      if (held->page != i) {
        held->page = i;
        for (int t = 0; t < P; ++t)
          for (int d = 0; d < D; ++d) {
            const float x = keys ? key_at(q, page, t, kv_head, d) : value_at(q, page, t, kv_head, d);
            store_float(p.dtype, held->rows.data(), int64_t(t) * D + d, x);
          }
      }
      return held->rows.data() + slot * row_size;
    };
  };
  KeyValueRows rows;
  rows.count = tail * P + p.kv.last_page_len_host[b];
  rows.key = reader(true);
  rows.value = reader(false);
  return rows;
}

}  // namespace

void quantize_pages(const QuantizeParams& p) {
  QuantizedPages q = p.dst;
  const int P = q.page_size, H = q.num_kv_heads, D = q.head_dim;
  for (int i = 0; i < p.count; ++i) {
    const int64_t src = p.src_pages_host[i], dst = p.dst_pages_host[i];
    for (const bool keys : {true, false}) {
      const void* base = keys ? p.k_src : p.v_src;
      quantize_tensor(q, keys, dst, [&](int t, int h, int d) {
        return quant_sanitize(load_float(p.dtype, base, ((src * P + t) * H + h) * D + d));
      });
    }
  }
}

void dequantize_pages(const DequantizeParams& p) {
  const QuantizedPages& q = p.src;
  const int P = q.page_size, H = q.num_kv_heads, D = q.head_dim;
  for (int i = 0; i < p.count; ++i) {
    const int64_t page = p.pages_host[i];
    for (int t = 0; t < P; ++t)
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < D; ++d) {
          const int64_t at = ((int64_t(i) * P + t) * H + h) * D + d;
          store_float(p.dtype, p.k_out, at, key_at(q, page, t, h, d));
          store_float(p.dtype, p.v_out, at, value_at(q, page, t, h, d));
        }
  }
}

void quantized_paged_decode(const QuantDecodeParams& p) {
  const QuantizedPages& q = p.quant;
  const int H = p.shape.num_q_heads, Hkv = p.shape.num_kv_heads, D = p.shape.head_dim, P = p.kv.page_size;
  const int group = H / Hkv;
  std::vector<float> row(D), query(int64_t(group) * D), acc(int64_t(group) * D);
  for (int b = 0; b < p.batch; ++b) {
    for (int hk = 0; hk < Hkv; ++hk) {
      // The table row of (b, hk): the sequence's, or the KV head's own (a Quest selection).
      const int table_row = p.kv.rows_per_sequence == 1 ? b : b * p.kv.rows_per_sequence + hk;
      const int begin = p.kv.indptr_host[table_row];
      const int npages = p.kv.indptr_host[table_row + 1] - begin;
      const int len = npages > 0 ? (npages - 1) * P + p.kv.last_page_len_host[table_row] : 0;
      // Row j of head hk into `row`: a quantized page, or the tail pool for the last page.
      auto load_row = [&](bool keys, int j) {
        const int page_idx = j / P, slot = j % P;
        const int64_t page = p.kv.indices_host[begin + page_idx];
        if (page_idx == npages - 1) {
          const void* pool = keys ? p.kv.k_pages : p.kv.v_pages;
          for (int d = 0; d < D; ++d) row[d] = load_float(p.dtype, pool, ((page * P + slot) * Hkv + hk) * D + d);
        } else {
          for (int d = 0; d < D; ++d) row[d] = keys ? key_at(q, page, slot, hk, d) : value_at(q, page, slot, hk, d);
        }
      };
      for (int g = 0; g < group; ++g)
        for (int d = 0; d < D; ++d) query[g * D + d] = load_float(p.dtype, p.q, (int64_t(b) * H + hk * group + g) * D + d);
      std::vector<float> logits(int64_t(group) * len);
      std::vector<float> max_logit(group, -std::numeric_limits<float>::infinity());
      for (int j = 0; j < len; ++j) {
        load_row(true, j);
        for (int g = 0; g < group; ++g) {
          float dot = 0.0f;
          for (int d = 0; d < D; ++d) dot += query[g * D + d] * row[d];
          logits[int64_t(g) * len + j] = dot * p.scale;
          max_logit[g] = std::max(max_logit[g], dot * p.scale);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::vector<float> denominator(group, 0.0f);
      for (int j = 0; j < len; ++j) {
        load_row(false, j);
        for (int g = 0; g < group; ++g) {
          const float w = std::exp(logits[int64_t(g) * len + j] - max_logit[g]);
          denominator[g] += w;
          for (int d = 0; d < D; ++d) acc[g * D + d] += w * row[d];
        }
      }
      for (int g = 0; g < group; ++g) {
        const int64_t out_row = int64_t(b) * H + hk * group + g;
        for (int d = 0; d < D; ++d)
          store_float(p.dtype, p.out, out_row * D + d, denominator[g] > 0 ? acc[g * D + d] / denominator[g] : 0.0f);
        if (p.lse) {
          p.lse[out_row] = denominator[g] > 0 ? max_logit[g] + std::log(denominator[g])
                                              : -std::numeric_limits<float>::infinity();
        }
      }
    }
  }
}

void quantized_paged_prefill(const QuantPrefillParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const int q_begin = p.cu_seqlens_q_host[b];
    auto rows = [&](int kv_head) { return quantized_rows(p, b, kv_head); };
    attend_sequence(p.dtype, p.shape, p.mask, p.q, p.out, p.lse, q_begin, p.cu_seqlens_q_host[b + 1] - q_begin, rows);
  }
}

}  // namespace kvflash::cpu
