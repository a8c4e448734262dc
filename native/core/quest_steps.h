// Quest's decode step as its three ops, for any backend: the scores, the top-k into a per-KV-head
// table, and the paged decode over it. The CPU backend's quest_decode is exactly this (the
// definition); the CUDA backend runs it where its fused kernel does not reach.
#pragma once
#include <cstdint>
#include <vector>

#include "backend.h"

namespace kvflash {

// The host arrays of a Quest selection's table (what topkPages returns) from the dense table's:
// row b * Hkv + h holds min(pages of b, budget) pages and sequence b's last-page length.
struct SelectionRows {
  std::vector<int32_t> indptr, last_page_len;
  int max_pages = 0;  // most pages of one row
};
SelectionRows selection_rows(const int32_t* indptr, const int32_t* last_page_len, int batch, int kv_heads,
                             int budget);

void quest_decode_in_steps(Backend& backend, const Device& device, const QuestDecodeParams& p);

}  // namespace kvflash
