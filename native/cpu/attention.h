// The attention references: readable loops, float32 arithmetic, one softmax routine shared by every
// variant (ragged prefill, paged prefill, paged decode, and quant.cpp's paged prefill over quantized
// pages), so the variants differ only in where keys live.
#pragma once
#include <functional>

#include "../core/attention_params.h"

namespace kvflash::cpu {

// Where the keys and values of one (sequence, KV head) live: row j's D elements of the op's dtype.
struct KeyValueRows {
  int count = 0;  // keys in the sequence
  std::function<const void*(int j)> key;
  std::function<const void*(int j)> value;
};

// Every query of one sequence (rows q_begin .. q_begin + num_queries of q and out, aligned to the end of
// its keys under the mask) against the keys `rows(kv_head)` gives; lse may be null.
void attend_sequence(DType dtype, const AttentionShape& shape, const AttentionMask& mask, const void* q, void* out,
                     float* lse, int q_begin, int num_queries, const std::function<KeyValueRows(int kv_head)>& rows);

void prefill(const PrefillParams& p);
void paged_prefill(const PagedPrefillParams& p);
void paged_decode(const DecodeParams& p);
void append_paged_kv(const AppendParams& p);
void attention_mass(const AttentionMassParams& p);

}  // namespace kvflash::cpu
