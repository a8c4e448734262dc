// What other ops need of Quest: appendPagedKV keeps a layer's metadata current through these.
#pragma once
#include <napi.h>

#include <vector>

#include "../core/tensor.h"

namespace kvflash::binding {

// The meta tensor argument, checked against its page pool ([numPages, 2, Hkv, D], same dtype/device).
const Tensor& check_quest_meta(const Napi::Value& v, const Tensor& k_pages);
// Recomputes the metadata of `pages` from their first valid_len[i] slots.
void update_quest_meta(const Tensor& k_pages, const Tensor& meta, std::vector<int32_t> pages,
                       std::vector<int32_t> valid_len);

}  // namespace kvflash::binding
