// The contract between the binding (which checks and prepares everything) and the attention kernels
// of each backend. Plain pointers and sizes: the CPU reference and the CUDA kernels read the same
// structs. Pointers are on the op's device; the *_host fields are host copies the binding already
// validated, for grid sizing and reference loops.
//
// Layouts (row-major, contiguous):
//   q, out     [Nq, H, D]           ragged: sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]
//   k, v       [Nk, Hkv, D]         ragged likewise with cu_seqlens_k
//   lse        [Nq, H] float32      natural log of the softmax denominator (of scaled logits)
//   pages      [num_pages, P, Hkv, D]  ("NHD"), one tensor for K and one for V
//   page table CSR: sequence b owns pages indices[indptr[b] .. indptr[b+1]); its last page holds
//              last_page_len[b] tokens (1..P), so its length is (pages - 1) * P + last_page_len[b].
// GQA: query head h reads KV head h / (H / Hkv).
// Causal masks align the queries to the END of their key sequence: with Sq queries and Sk keys,
// query i sits at position Sk - Sq + i and sees keys 0 .. that position (and, with window_left >= 0,
// only keys at distance <= window_left).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace kvflash {

struct AttentionShape {
  int num_q_heads = 0;   // H
  int num_kv_heads = 0;  // Hkv, divides H
  int head_dim = 0;      // D
};

struct AttentionMask {
  bool causal = true;
  int window_left = -1;  // -1: unlimited
  float scale = 1.0f;    // multiplies q.k before the softmax
};

struct PagedKV {
  const void* k_pages = nullptr;
  const void* v_pages = nullptr;
  int num_pages = 0;
  int page_size = 0;  // P, a power of two
  // 1: one table row per sequence, shared by its KV heads. num_kv_heads: row b * Hkv + h lists the
  // pages KV head h of sequence b reads (Quest's per-head selections); lengths are per row too.
  int rows_per_sequence = 1;
  const int32_t* indptr = nullptr;         // [B+1]
  const int32_t* indices = nullptr;        // [nnz]
  const int32_t* last_page_len = nullptr;  // [B]
  const int32_t* indptr_host = nullptr;
  const int32_t* indices_host = nullptr;
  const int32_t* last_page_len_host = nullptr;
};

struct PrefillParams {
  DType dtype = DType::BF16;  // of q, k, v, out
  AttentionShape shape;
  AttentionMask mask;
  int batch = 0;
  int total_q = 0, total_k = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // may be null
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* cu_seqlens_q_host = nullptr;
  const int32_t* cu_seqlens_k_host = nullptr;
};

// Queries (ragged, as in PrefillParams) attend to their sequence's paged KV, which already holds
// them: the key length of sequence b is its paged length.
struct PagedPrefillParams {
  DType dtype = DType::BF16;
  AttentionShape shape;
  AttentionMask mask;
  int batch = 0;
  int total_q = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0;
  const void* q = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_q_host = nullptr;
  PagedKV kv;
};

// One query token per sequence (q, out [B, H, D]) over the whole paged sequence; no mask needed.
struct DecodeParams {
  DType dtype = DType::BF16;
  AttentionShape shape;
  float scale = 1.0f;
  int batch = 0;
  int max_pages_per_seq = 0;  // host-known maximum of indptr[b+1] - indptr[b]
  int splits = 0;             // 0: chosen by the backend; else split each sequence this many ways (tests, tuning)
  const void* q = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  PagedKV kv;
};

// The attention probability mass each cached token (or page) receives from a sequence's queries:
//   out[t][h] = sum over the queries i of t's sequence that see t, and the query heads g of KV head h,
//               of exp(scale * q[i][g] . k[t][h] - lse[i][g])
// with lse from the attention call over the same cache (so each query's masses sum to 1 over its
// keys). Per page, the masses of the page's tokens are summed. The eviction policies read it: H2O
// accumulates page mass over decode steps, SnapKV scores tokens by an observation window's queries.
struct AttentionMassParams {
  DType dtype = DType::BF16;
  AttentionShape shape;
  bool causal = true;  // queries aligned to the end of their sequence, as in PagedPrefillParams
  float scale = 1.0f;
  bool per_page = false;  // out [nnz, Hkv] per page entry of the table, else [total tokens, Hkv]
  int batch = 0;
  int nnz = 0;
  const void* q = nullptr;     // [Nq, H, D], ragged by cu_seqlens_q
  const float* lse = nullptr;  // [Nq, H]
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_q_host = nullptr;
  const int32_t* token_offsets = nullptr;  // [B+1]: sequence b's tokens start at row token_offsets[b] of out
  const int32_t* token_offsets_host = nullptr;
  PagedKV kv;  // a dense table (one row per sequence)
  float* out = nullptr;
};

// Writes token t (k, v [N, Hkv, D]) at position positions[t] of sequence batch_indices[t].
struct AppendParams {
  DType dtype = DType::BF16;
  AttentionShape shape;
  int num_tokens = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  void* k_pages = nullptr;
  void* v_pages = nullptr;
  PagedKV kv;  // the table, including the new tokens; its page pointers are unused here
  const int32_t* batch_indices = nullptr;
  const int32_t* positions = nullptr;
};

}  // namespace kvflash
