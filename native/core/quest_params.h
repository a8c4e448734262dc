// Quest (query-aware page selection): the contract between the binding and each backend.
//
// Metadata of a layer: meta [numPages, 2, Hkv, D] in the page dtype; meta[p][0] is the channel-wise
// minimum and meta[p][1] the maximum of the keys in page p's valid slots (exact: a min or max of
// values is one of them, so the page dtype holds it without rounding).
// Scores: for each page entry e of the table (CSR order) and KV head h,
//   scores[e][h] = max over the query heads q of h's group of  sum_d max(q_d * min_d, q_d * max_d),
// an upper bound of q.k over the page (Quest's U_p).
// Selection: per (sequence, KV head), the sequence's last page always, plus the budget - 1 best other
// pages (higher score first, then earlier page), listed in page order; all pages when they fit.
#pragma once
#include <cstdint>

#include "attention_params.h"

namespace kvflash {

// Recomputes the metadata of `num_pages_to_update` pages from their first valid_len[i] slots, into
// the metadata of page meta_pages[i] (a quantized layer's page, whose keys come from a
// full-precision page), or of the page itself when meta_pages is null.
struct QuestMetaParams {
  DType dtype = DType::BF16;
  int num_kv_heads = 0, head_dim = 0, page_size = 0;
  const void* k_pages = nullptr;
  void* meta = nullptr;
  int num_pages_to_update = 0;
  const int32_t* pages = nullptr;      // [n] page indices
  const int32_t* valid_len = nullptr;  // [n] 1..P
  const int32_t* pages_host = nullptr;
  const int32_t* valid_len_host = nullptr;
  const int32_t* meta_pages = nullptr;       // [n] or null
  const int32_t* meta_pages_host = nullptr;  // [n] or null
};

struct QuestScoreParams {
  DType dtype = DType::BF16;
  AttentionShape shape;
  int batch = 0;
  int nnz = 0;        // page entries in the table
  int max_pages = 0;  // most pages of one sequence
  const void* q = nullptr;     // [B, H, D]
  const void* meta = nullptr;  // [numPages, 2, Hkv, D]
  PagedKV kv;                  // the dense table (rows_per_sequence 1)
  float* scores = nullptr;     // [nnz, Hkv]
  // The layer is quantized: each sequence's last page is a tail page with no metadata, scored +inf
  // (topkPages keeps it anyway); the metadata covers the quantized pages only.
  bool last_is_tail = false;
};

struct TopkPagesParams {
  int batch = 0, num_kv_heads = 0, budget = 0;
  int max_pages = 0;             // most pages of one sequence (sizes the selection's scratch)
  const float* scores = nullptr;  // [nnz, Hkv]
  PagedKV kv;                    // the dense table
  // The selection's table, written by the op: row b * Hkv + h holds min(pages of b, budget) pages.
  int32_t* out_indptr = nullptr;         // [B * Hkv + 1]
  int32_t* out_indices = nullptr;        // [sum of the rows]
  int32_t* out_last_page_len = nullptr;  // [B * Hkv]
};

// Quest's decode step as one op: the scores, the selection of `budget` pages per (sequence, KV
// head), and the decode of each KV head's group over its selection. The result is that of
// pagedDecode over topkPages(questScores(...)): a backend may run exactly those three.
struct QuestDecodeParams {
  DType dtype = DType::BF16;
  AttentionShape shape;
  float scale = 1.0f;
  int batch = 0;
  int budget = 0;             // pages kept per (sequence, KV head), >= 1
  int max_pages_per_seq = 0;  // host-known maximum of indptr[b+1] - indptr[b]
  int splits = 0;             // 0: chosen by the backend; else blocks per (sequence, KV head) (tests, tuning)
  const void* q = nullptr;     // [B, H, D]
  const void* meta = nullptr;  // [numPages, 2, Hkv, D]
  void* out = nullptr;         // [B, H, D]
  float* lse = nullptr;        // [B, H], may be null
  PagedKV kv;                  // the dense table (rows_per_sequence 1) over the pool
};

}  // namespace kvflash
