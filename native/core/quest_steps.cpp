#include "quest_steps.h"

#include <algorithm>
#include <vector>

namespace kvflash {

SelectionRows selection_rows(const int32_t* indptr, const int32_t* last_page_len, int batch, int kv_heads,
                             int budget) {
  SelectionRows rows;
  rows.indptr.push_back(0);
  for (int b = 0; b < batch; ++b) {
    const int n = std::min(indptr[b + 1] - indptr[b], budget);
    for (int h = 0; h < kv_heads; ++h) {
      rows.indptr.push_back(rows.indptr.back() + n);
      rows.last_page_len.push_back(last_page_len[b]);
    }
    rows.max_pages = std::max(rows.max_pages, n);
  }
  return rows;
}

void quest_decode_in_steps(Backend& backend, const Device& device, const QuestDecodeParams& p) {
  if (p.batch == 0) return;
  const int kv_heads = p.shape.num_kv_heads;
  const int nnz = p.kv.indptr_host[p.batch];
  const Tensor scores = empty({nnz, kv_heads}, DType::F32, device);
  QuestScoreParams s;
  s.dtype = p.dtype;
  s.shape = p.shape;
  s.batch = p.batch;
  s.nnz = nnz;
  s.max_pages = p.max_pages_per_seq;
  s.q = p.q;
  s.meta = p.meta;
  s.kv = p.kv;
  s.scores = scores.data_as<float>();
  backend.quest_scores(device, s);

  const SelectionRows sel = selection_rows(p.kv.indptr_host, p.kv.last_page_len_host, p.batch, kv_heads, p.budget);
  const int64_t rows = static_cast<int64_t>(p.batch) * kv_heads;
  const Tensor sel_indptr = empty({rows + 1}, DType::I32, device);
  const Tensor sel_indices = empty({sel.indptr.back()}, DType::I32, device);
  const Tensor sel_last = empty({rows}, DType::I32, device);
  TopkPagesParams t;
  t.batch = p.batch;
  t.num_kv_heads = kv_heads;
  t.budget = p.budget;
  t.max_pages = p.max_pages_per_seq;
  t.scores = scores.data_as<float>();
  t.kv = p.kv;
  t.out_indptr = sel_indptr.data_as<int32_t>();
  t.out_indices = sel_indices.data_as<int32_t>();
  t.out_last_page_len = sel_last.data_as<int32_t>();
  backend.topk_pages(device, t);

  DecodeParams d;
  d.dtype = p.dtype;
  d.shape = p.shape;
  d.scale = p.scale;
  d.batch = p.batch;
  d.max_pages_per_seq = sel.max_pages;
  d.q = p.q;
  d.out = p.out;
  d.lse = p.lse;
  d.kv = p.kv;
  d.kv.rows_per_sequence = kv_heads;
  d.kv.indptr = t.out_indptr;
  d.kv.indices = t.out_indices;
  d.kv.last_page_len = t.out_last_page_len;
  // Host copies: the lengths are known here; the chosen pages only where the device is the host.
  d.kv.indptr_host = sel.indptr.data();
  d.kv.last_page_len_host = sel.last_page_len.data();
  d.kv.indices_host = device.is_cuda() ? nullptr : t.out_indices;
  backend.paged_decode(device, d);
}

}  // namespace kvflash
