// Quest ops: page metadata, page scores, and top-k page selection into per-KV-head tables.
#include <algorithm>
#include <cmath>
#include <utility>

#include "../core/backend.h"
#include "../core/quest_steps.h"
#include "args.h"
#include "exports.h"
#include "page_table.h"
#include "quest_functions.h"
#include "tensor_args.h"
#include "tensor_handle.h"

namespace kvflash::binding {

namespace {

// The metadata argument `name`: [pages, 2, kvHeads, headDim] of `layer` (how messages name it), in
// `dtype` on `device` (`like`: whose they are).
const Tensor& check_meta(const Napi::Value& v, const char* name, const Shape& expected, const char* layer, DType dtype,
                         const Device& device, const char* like) {
  const Tensor& meta = TensorHandle::unwrap(v, name);
  KV_CHECK(meta.shape() == expected, Shape, "Expected ", name, " of shape ", shape_str(expected),
           " ([numPages, 2, kvHeads, headDim] of ", layer, ") but received ", shape_str(meta.shape()));
  KV_CHECK(meta.dtype() == dtype && meta.device() == device, Dtype, "Expected ", name, " of ", dtype_name(dtype), " on ",
           device.name(), " ", like, " but received ", meta.describe());
  return meta;
}

}  // namespace

const Tensor& check_quest_meta(const Napi::Value& v, const Tensor& k_pages) {
  return check_meta(v, "meta", {k_pages.size(0), 2, k_pages.size(2), k_pages.size(3)}, "this page pool",
                    k_pages.dtype(), k_pages.device(), "like kPages");
}

const Tensor& check_quantized_quest_meta(const Napi::Value& v, int64_t num_pages, int64_t kv_heads, int64_t head_dim,
                                         DType dtype, const Device& device) {
  return check_meta(v, "questMeta", {num_pages, 2, kv_heads, head_dim}, "the quantized pages", dtype, device,
                    "(the full-precision keys')");
}

void update_quest_meta(const Tensor& k_pages, const Tensor& meta, std::vector<int32_t> pages,
                       std::vector<int32_t> valid_len, std::vector<int32_t> meta_pages) {
  if (pages.empty()) return;
  const Device device = k_pages.device();
  const Tensor pages_dev = PageTableHandle::upload(pages, device);
  const Tensor valid_dev = PageTableHandle::upload(valid_len, device);
  const Tensor meta_pages_dev = meta_pages.empty() ? Tensor() : PageTableHandle::upload(meta_pages, device);
  QuestMetaParams p;
  p.dtype = k_pages.dtype();
  p.num_kv_heads = static_cast<int>(k_pages.size(2));
  p.head_dim = static_cast<int>(k_pages.size(3));
  p.page_size = static_cast<int>(k_pages.size(1));
  p.k_pages = k_pages.data();
  p.meta = meta.data();
  p.num_pages_to_update = static_cast<int>(pages.size());
  p.pages = pages_dev.data_as<int32_t>();
  p.valid_len = valid_dev.data_as<int32_t>();
  p.pages_host = pages.data();
  p.valid_len_host = valid_len.data();
  if (!meta_pages.empty()) {
    p.meta_pages = meta_pages_dev.data_as<int32_t>();
    p.meta_pages_host = meta_pages.data();
  }
  backend_for(device).quest_update_meta(device, p);
}

namespace {

const Tensor& pool_arg(const Napi::Value& v) {
  const Tensor& k_pages = TensorHandle::unwrap(v, "kPages");
  KV_CHECK(k_pages.dim() == 4, Shape, "Expected rank 4 for kPages but received ", k_pages.describe());
  check_float_input(k_pages, "kPages");
  return k_pages;
}

std::shared_ptr<const StagedPageTable> dense_table(const Napi::Value& v, const Device& device) {
  auto table = PageTableHandle::unwrap(v, "table");
  KV_CHECK(table->device == device, Device, "Expected a page table staged on ", device.name(),
           " but received one staged on ", table->device.name());
  KV_CHECK(table->rows_per_sequence == 1 && !table->indices.empty(), Range,
           "Expected a dense page table (one row per sequence) but received a per-KV-head selection");
  return table;
}

// buildQuestMeta(kPages, meta, table): recomputes the metadata of every page the table lists.
Napi::Value build_quest_meta(const Napi::CallbackInfo& info) {
  const Tensor& k_pages = pool_arg(info[0]);
  const Tensor& meta = check_quest_meta(info[1], k_pages);
  auto table = dense_table(info[2], k_pages.device());
  const int page_size = static_cast<int>(k_pages.size(1));
  table->bind(k_pages.data(), k_pages.data(), k_pages.size(0), page_size);  // checks the table fits this pool
  std::vector<int32_t> pages, valid_len;
  for (int b = 0; b < table->batch; ++b) {
    for (int32_t e = table->indptr[b]; e < table->indptr[b + 1]; ++e) {
      pages.push_back(table->indices[e]);
      valid_len.push_back(e + 1 < table->indptr[b + 1] ? page_size : table->last_page_len[b]);
    }
  }
  update_quest_meta(k_pages, meta, std::move(pages), std::move(valid_len));
  return info.Env().Undefined();
}

// questScores(q, kPages, meta, table) -> scores [nnz, Hkv] f32. kPages null: a quantized layer, whose
// meta [numPages, 2, Hkv, D] covers its quantized pages and whose rows end at a tail page.
Napi::Value quest_scores(const Napi::CallbackInfo& info) {
  const Tensor& q = TensorHandle::unwrap(info[0], "q");
  const bool quantized = info[1].IsNull() || info[1].IsUndefined();
  const Tensor* k_pages = quantized ? nullptr : &pool_arg(info[1]);
  const Tensor& meta = quantized ? TensorHandle::unwrap(info[2], "meta") : check_quest_meta(info[2], *k_pages);
  check_float_input(meta, "meta");
  KV_CHECK(meta.dim() == 4 && meta.size(1) == 2, Shape, "Expected meta of shape [numPages, 2, kvHeads, headDim] but received ",
           meta.describe());
  KV_CHECK(q.dim() == 3 && q.size(2) == meta.size(3), Shape, "Expected q of shape [B, H, ", meta.size(3),
           "] but received ", q.describe());
  KV_CHECK(q.dtype() == meta.dtype() && q.device() == meta.device(), Dtype, "Expected q of ", dtype_name(meta.dtype()),
           " on ", meta.device().name(), " like ", quantized ? "meta" : "kPages", " but received ", q.describe());
  auto table = dense_table(info[3], q.device());
  table->check_query_rows(q);
  const int64_t kv_heads = meta.size(2);
  const int64_t dim = q.size(2);
  KV_CHECK(!q.device().is_cuda() || dim == 64 || dim == 128 || dim == 256, Unsupported,
           "Expected head dim 64, 128 or 256 on a GPU but received ", dim);
  KV_CHECK(q.size(1) % kv_heads == 0, Shape, "Expected the ", kv_heads, " KV heads to divide the ", q.size(1),
           " query heads of q");
  QuestScoreParams p;
  p.dtype = q.dtype();
  p.shape = {static_cast<int>(q.size(1)), static_cast<int>(kv_heads), static_cast<int>(q.size(2))};
  p.batch = table->batch;
  p.nnz = static_cast<int>(table->indices.size());
  p.max_pages = table->max_pages;
  if (quantized) {
    KV_CHECK(table->max_inner_index < meta.size(0), Range, "Expected the pages before each sequence's last in [0, ",
             meta.size(0), ") (the quantized pages of meta) but the table reaches ", table->max_inner_index);
    p.kv = table->view();
    p.kv.num_pages = static_cast<int>(meta.size(0));
    p.last_is_tail = true;
  } else {
    p.kv = table->bind(k_pages->data(), k_pages->data(), k_pages->size(0), k_pages->size(1));
  }
  Tensor scores = empty({p.nnz, kv_heads}, DType::F32, q.device());
  p.q = q.data();
  p.meta = meta.data();
  p.scores = scores.data_as<float>();
  if (p.nnz > 0) backend_for(q.device()).quest_scores(q.device(), p);
  return TensorHandle::wrap(info.Env(), scores);
}

// topkPages(scores, table, budgetPages) -> a table with a row per (sequence, KV head)
Napi::Value topk_pages(const Napi::CallbackInfo& info) {
  const Tensor& scores = TensorHandle::unwrap(info[0], "scores");
  KV_CHECK(scores.dtype() == DType::F32 && scores.dim() == 2, Dtype, "Expected f32 [nnz, kvHeads] scores but received ",
           scores.describe());
  auto table = dense_table(info[1], scores.device());
  KV_CHECK(scores.size(0) == static_cast<int64_t>(table->indices.size()), Shape, "Expected ", table->indices.size(),
           " rows (one per page entry of the table) for scores but received ", scores.size(0));
  const int budget = static_cast<int>(get_int(info[2], "budgetPages", 1, INT32_MAX));
  const int kv_heads = static_cast<int>(scores.size(1));
  auto selected = std::make_shared<StagedPageTable>();
  selected->device = table->device;
  selected->batch = table->batch;
  selected->rows_per_sequence = kv_heads;
  selected->max_index = table->max_index;
  selected->max_inner_index = table->max_inner_index;
  selected->max_last_index = table->max_last_index;
  selected->max_last_page_len = table->max_last_page_len;
  SelectionRows sel = selection_rows(table->indptr.data(), table->last_page_len.data(), table->batch, kv_heads, budget);
  selected->indptr = std::move(sel.indptr);
  selected->last_page_len = std::move(sel.last_page_len);
  selected->max_pages = sel.max_pages;
  // The op writes the selection's arrays on the device; the host copies above serve the checks.
  const Device device = table->device;
  const int64_t rows = static_cast<int64_t>(table->batch) * kv_heads;
  selected->indptr_dev = empty({rows + 1}, DType::I32, device);
  selected->last_page_len_dev = empty({rows}, DType::I32, device);
  selected->indices_dev = empty({selected->indptr.back()}, DType::I32, device);
  TopkPagesParams p;
  p.batch = table->batch;
  p.num_kv_heads = kv_heads;
  p.budget = budget;
  p.max_pages = table->max_pages;
  p.scores = scores.data_as<float>();
  p.kv = table->view();
  p.out_indptr = selected->indptr_dev.data_as<int32_t>();
  p.out_indices = selected->indices_dev.data_as<int32_t>();
  p.out_last_page_len = selected->last_page_len_dev.data_as<int32_t>();
  backend_for(device).topk_pages(device, p);
  // On the host the selection is known at once; keep it, as for any staged table.
  if (!device.is_cuda()) {
    const int32_t* chosen = selected->indices_dev.data_as<int32_t>();
    selected->indices.assign(chosen, chosen + selected->indptr.back());
  }
  return PageTableHandle::wrap(info.Env(), std::move(selected));
}

}  // namespace

void export_quest_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("buildQuestMeta", Napi::Function::New<guarded<build_quest_meta>>(env, "buildQuestMeta"));
  exports.Set("questScores", Napi::Function::New<guarded<quest_scores>>(env, "questScores"));
  exports.Set("topkPages", Napi::Function::New<guarded<topk_pages>>(env, "topkPages"));
}

}  // namespace kvflash::binding
