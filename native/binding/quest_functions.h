// What other ops need of Quest: appendPagedKV keeps a layer's metadata current through these.
#pragma once
#include <napi.h>

#include <vector>

#include "../core/tensor.h"

namespace kvflash::binding {

// The meta tensor argument, checked against its page pool ([numPages, 2, Hkv, D], same dtype/device).
const Tensor& check_quest_meta(const Napi::Value& v, const Tensor& k_pages);
// Recomputes the metadata of `pages` from their first valid_len[i] slots, into the metadata rows
// `meta_pages` (another layer's pages: a quantized one's), or the pages' own when it is empty.
void update_quest_meta(const Tensor& k_pages, const Tensor& meta, std::vector<int32_t> pages,
                       std::vector<int32_t> valid_len, std::vector<int32_t> meta_pages = {});
// The meta argument of a quantized layer of `num_pages` pages, Hkv KV heads and head dim D: [num_pages,
// 2, Hkv, D] in `dtype` (its full-precision pages') on `device`.
const Tensor& check_quantized_quest_meta(const Napi::Value& v, int64_t num_pages, int64_t kv_heads, int64_t head_dim,
                                         DType dtype, const Device& device);

}  // namespace kvflash::binding
