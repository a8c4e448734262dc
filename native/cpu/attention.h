// The attention references: readable loops, float32 arithmetic, one softmax routine shared by every
// variant (ragged prefill, paged prefill, paged decode), so the variants differ only in where keys live.
#pragma once
#include "../core/attention_params.h"

namespace kvflash::cpu {

void prefill(const PrefillParams& p);
void paged_prefill(const PagedPrefillParams& p);
void paged_decode(const DecodeParams& p);
void append_paged_kv(const AppendParams& p);
void attention_mass(const AttentionMassParams& p);

}  // namespace kvflash::cpu
