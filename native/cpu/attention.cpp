#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "../core/element_access.h"

namespace kvflash::cpu {
namespace {

// One query row against the keys it may see (positions [first, last]): softmax(scale * q.k) . v.
// Writes out (D elements of `dtype`) and returns the log-sum-exp, -inf when no key is visible.
float attend(DType dtype, int head_dim, const void* q, const KeyValueRows& kv, int first, int last, float scale,
             void* out) {
  std::vector<float> query(head_dim);
  for (int d = 0; d < head_dim; ++d) query[d] = load_float(dtype, q, d);
  std::vector<float> logits;
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int j = first; j <= last; ++j) {
    const void* key = kv.key(j);
    float dot = 0.0f;
    for (int d = 0; d < head_dim; ++d) dot += query[d] * load_float(dtype, key, d);
    logits.push_back(dot * scale);
    max_logit = std::max(max_logit, logits.back());
  }
  // The two long sums run in double: summed one by one in float, a million terms of similar size
  // stagnate (lse off by 1.4e-3 at 2^20 keys), and the oracle must stay exact at the longest contexts.
  std::vector<double> acc(head_dim, 0.0);
  double denominator = 0.0;
  for (int j = first; j <= last; ++j) {
    const float weight = std::exp(logits[j - first] - max_logit);
    denominator += weight;
    const void* value = kv.value(j);
    for (int d = 0; d < head_dim; ++d) acc[d] += double(weight) * load_float(dtype, value, d);
  }
  for (int d = 0; d < head_dim; ++d) {
    store_float(dtype, out, d, denominator > 0 ? static_cast<float>(acc[d] / denominator) : 0.0f);
  }
  return denominator > 0 ? max_logit + static_cast<float>(std::log(denominator))
                         : -std::numeric_limits<float>::infinity();
}

// The keys query i (of num_queries, aligned to the end of num_keys) may see under the mask.
void visible_keys(const AttentionMask& mask, int i, int num_queries, int num_keys, int* first, int* last) {
  const int position = num_keys - num_queries + i;
  *last = mask.causal ? position : num_keys - 1;
  *first = mask.window_left >= 0 ? std::max(0, position - mask.window_left) : 0;
}

size_t row_bytes(DType dtype, int heads, int head_dim) { return dtype_size(dtype) * size_t(heads) * head_dim; }

// Rows of one sequence's keys in a paged pool: position j is slot j % P of its (j / P)-th page.
// With a table row per KV head, each head reads its own list of pages.
KeyValueRows paged_rows(DType dtype, const AttentionShape& shape, const PagedKV& kv, int b, int kv_head) {
  const int row = kv.rows_per_sequence == 1 ? b : b * kv.rows_per_sequence + kv_head;
  const int32_t begin = kv.indptr_host[row];
  const int32_t pages = kv.indptr_host[row + 1] - begin;
  const size_t token_bytes = row_bytes(dtype, shape.num_kv_heads, shape.head_dim);
  const size_t head_offset = dtype_size(dtype) * size_t(kv_head) * shape.head_dim;
  auto at = [=](const void* pool, int j) {
    const int64_t page = kv.indices_host[begin + j / kv.page_size];
    const int64_t slot = j % kv.page_size;
    return static_cast<const void*>(static_cast<const char*>(pool) + (page * kv.page_size + slot) * token_bytes +
                                    head_offset);
  };
  KeyValueRows rows;
  rows.count = (pages - 1) * kv.page_size + kv.last_page_len_host[row];
  rows.key = [=](int j) { return at(kv.k_pages, j); };
  rows.value = [=](int j) { return at(kv.v_pages, j); };
  return rows;
}

}  // namespace

void attend_sequence(DType dtype, const AttentionShape& shape, const AttentionMask& mask, const void* q, void* out,
                     float* lse, int q_begin, int num_queries, const std::function<KeyValueRows(int kv_head)>& rows) {
  const int group = shape.num_q_heads / shape.num_kv_heads;
  const size_t q_row = row_bytes(dtype, shape.num_q_heads, shape.head_dim);
  const size_t head_bytes = row_bytes(dtype, 1, shape.head_dim);
  for (int kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head) {
    const KeyValueRows kv = rows(kv_head);
    for (int i = 0; i < num_queries; ++i) {
      int first, last;
      visible_keys(mask, i, num_queries, kv.count, &first, &last);
      for (int h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        const size_t offset = (q_begin + i) * q_row + h * head_bytes;
        const float row_lse = attend(dtype, shape.head_dim, static_cast<const char*>(q) + offset, kv, first, last,
                                     mask.scale, static_cast<char*>(out) + offset);
        if (lse) lse[int64_t(q_begin + i) * shape.num_q_heads + h] = row_lse;
      }
    }
  }
}

void prefill(const PrefillParams& p) {
  const size_t k_row = row_bytes(p.dtype, p.shape.num_kv_heads, p.shape.head_dim);
  const size_t head_bytes = row_bytes(p.dtype, 1, p.shape.head_dim);
  for (int b = 0; b < p.batch; ++b) {
    const int q_begin = p.cu_seqlens_q_host[b];
    const int k_begin = p.cu_seqlens_k_host[b];
    const int num_keys = p.cu_seqlens_k_host[b + 1] - k_begin;
    auto rows = [&](int kv_head) {
      KeyValueRows kv;
      kv.count = num_keys;
      kv.key = [&, kv_head](int j) {
        return static_cast<const void*>(static_cast<const char*>(p.k) + (k_begin + j) * k_row + kv_head * head_bytes);
      };
      kv.value = [&, kv_head](int j) {
        return static_cast<const void*>(static_cast<const char*>(p.v) + (k_begin + j) * k_row + kv_head * head_bytes);
      };
      return kv;
    };
    attend_sequence(p.dtype, p.shape, p.mask, p.q, p.out, p.lse, q_begin, p.cu_seqlens_q_host[b + 1] - q_begin, rows);
  }
}

void paged_prefill(const PagedPrefillParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const int q_begin = p.cu_seqlens_q_host[b];
    auto rows = [&](int kv_head) { return paged_rows(p.dtype, p.shape, p.kv, b, kv_head); };
    attend_sequence(p.dtype, p.shape, p.mask, p.q, p.out, p.lse, q_begin, p.cu_seqlens_q_host[b + 1] - q_begin, rows);
  }
}

void paged_decode(const DecodeParams& p) {
  // Decode is paged prefill with one query per sequence, which sits at the end and sees everything.
  AttentionMask mask;
  mask.causal = false;
  mask.scale = p.scale;
  for (int b = 0; b < p.batch; ++b) {
    auto rows = [&](int kv_head) { return paged_rows(p.dtype, p.shape, p.kv, b, kv_head); };
    attend_sequence(p.dtype, p.shape, mask, p.q, p.out, p.lse, b, 1, rows);
  }
}

void attention_mass(const AttentionMassParams& p) {
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  const int D = p.shape.head_dim;
  const int64_t width = p.shape.num_kv_heads;
  const int64_t rows = p.per_page ? p.nnz : p.token_offsets_host[p.batch];
  std::fill(p.out, p.out + rows * width, 0.0f);
  for (int b = 0; b < p.batch; ++b) {
    const int q_begin = p.cu_seqlens_q_host[b];
    const int num_queries = p.cu_seqlens_q_host[b + 1] - q_begin;
    for (int h = 0; h < p.shape.num_kv_heads; ++h) {
      const KeyValueRows kv = paged_rows(p.dtype, p.shape, p.kv, b, h);
      AttentionMask mask;
      mask.causal = p.causal;
      for (int i = 0; i < num_queries; ++i) {
        int first, last;
        visible_keys(mask, i, num_queries, kv.count, &first, &last);
        for (int g = h * group; g < (h + 1) * group; ++g) {
          const int64_t row = int64_t(q_begin + i) * p.shape.num_q_heads + g;
          const float lse = p.lse[row];
          for (int j = first; j <= last; ++j) {
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot += load_float(p.dtype, p.q, row * D + d) * load_float(p.dtype, kv.key(j), d);
            const int64_t at = p.per_page ? p.kv.indptr_host[b] + j / p.kv.page_size : p.token_offsets_host[b] + j;
            p.out[at * width + h] += std::exp(dot * p.scale - lse);
          }
        }
      }
    }
  }
}

void append_paged_kv(const AppendParams& p) {
  const size_t token_bytes = row_bytes(p.dtype, p.shape.num_kv_heads, p.shape.head_dim);
  for (int t = 0; t < p.num_tokens; ++t) {
    const int b = p.batch_indices[t];
    const int position = p.positions[t];
    const int64_t page = p.kv.indices_host[p.kv.indptr_host[b] + position / p.kv.page_size];
    const size_t offset = (page * p.kv.page_size + position % p.kv.page_size) * token_bytes;
    std::memcpy(static_cast<char*>(p.k_pages) + offset, static_cast<const char*>(p.k) + t * token_bytes, token_bytes);
    std::memcpy(static_cast<char*>(p.v_pages) + offset, static_cast<const char*>(p.v) + t * token_bytes, token_bytes);
  }
}

}  // namespace kvflash::cpu
