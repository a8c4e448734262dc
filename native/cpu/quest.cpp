#include "quest.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../core/element_access.h"

namespace kvflash::cpu {

void quest_update_meta(const QuestMetaParams& p) {
  const int64_t row = int64_t(p.num_kv_heads) * p.head_dim;  // elements of one token
  for (int i = 0; i < p.num_pages_to_update; ++i) {
    const int64_t page = p.pages_host[i];
    const int64_t meta_page = p.meta_pages_host ? p.meta_pages_host[i] : page;
    for (int64_t c = 0; c < row; ++c) {
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      for (int slot = 0; slot < p.valid_len_host[i]; ++slot) {
        const float k = load_float(p.dtype, p.k_pages, (page * p.page_size + slot) * row + c);
        lo = std::min(lo, k);
        hi = std::max(hi, k);
      }
      store_float(p.dtype, p.meta, (meta_page * 2 + 0) * row + c, lo);
      store_float(p.dtype, p.meta, (meta_page * 2 + 1) * row + c, hi);
    }
  }
}

void quest_scores(const QuestScoreParams& p) {
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  const int D = p.shape.head_dim;
  const int64_t row = int64_t(p.shape.num_kv_heads) * D;
  for (int b = 0; b < p.batch; ++b) {
    for (int32_t e = p.kv.indptr_host[b]; e < p.kv.indptr_host[b + 1]; ++e) {
      const int64_t page = p.kv.indices_host[e];
      if (p.last_is_tail && e + 1 == p.kv.indptr_host[b + 1]) {
        for (int h = 0; h < p.shape.num_kv_heads; ++h)
          p.scores[int64_t(e) * p.shape.num_kv_heads + h] = std::numeric_limits<float>::infinity();
        continue;
      }
      for (int h = 0; h < p.shape.num_kv_heads; ++h) {
        float best = -std::numeric_limits<float>::infinity();
        for (int qh = h * group; qh < (h + 1) * group; ++qh) {
          float bound = 0.0f;
          for (int d = 0; d < D; ++d) {
            const float q = load_float(p.dtype, p.q, (int64_t(b) * p.shape.num_q_heads + qh) * D + d);
            const float lo = load_float(p.dtype, p.meta, (page * 2 + 0) * row + h * D + d);
            const float hi = load_float(p.dtype, p.meta, (page * 2 + 1) * row + h * D + d);
            bound += std::max(q * lo, q * hi);
          }
          best = std::max(best, bound);
        }
        p.scores[int64_t(e) * p.shape.num_kv_heads + h] = best;
      }
    }
  }
}

void topk_pages(const TopkPagesParams& p) {
  int32_t* out = p.out_indices;
  p.out_indptr[0] = 0;
  for (int b = 0; b < p.batch; ++b) {
    const int32_t begin = p.kv.indptr_host[b];
    const int n = p.kv.indptr_host[b + 1] - begin;
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int row = b * p.num_kv_heads + h;
      p.out_indptr[row + 1] = p.out_indptr[row] + std::min(n, p.budget);
      p.out_last_page_len[row] = p.kv.last_page_len_host[b];
      std::vector<int> chosen(n);
      std::iota(chosen.begin(), chosen.end(), 0);
      if (n > p.budget) {
        // Rank the pages before the last: higher score first, earlier page on ties.
        std::vector<int> others(chosen.begin(), chosen.end() - 1);
        auto score = [&](int j) { return p.scores[int64_t(begin + j) * p.num_kv_heads + h]; };
        std::stable_sort(others.begin(), others.end(), [&](int a, int c) { return score(a) > score(c); });
        others.resize(p.budget - 1);
        others.push_back(n - 1);
        std::sort(others.begin(), others.end());
        chosen = others;
      }
      for (int j : chosen) *out++ = p.kv.indices_host[begin + j];
    }
  }
}

}  // namespace kvflash::cpu
