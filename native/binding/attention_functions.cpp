// Attention ops: every pointer contract is checked here on the host, before any kernel runs, so a
// kernel never sees an index outside its buffers. Index arrays arrive as Int32Arrays (host), are
// checked, and are uploaded to the op's device.
#include <cmath>
#include <string>

#include "../core/backend.h"
#include "args.h"
#include "attention_functions.h"
#include "exports.h"
#include "page_table.h"
#include "quest_functions.h"
#include "tensor_args.h"
#include "tensor_handle.h"

namespace kvflash::binding {
namespace {

AttentionShape check_heads(const Tensor& q, int64_t kv_heads, int64_t kv_dim, const char* kv_name) {
  AttentionShape s;
  s.num_q_heads = static_cast<int>(q.size(1));
  s.num_kv_heads = static_cast<int>(kv_heads);
  s.head_dim = static_cast<int>(q.size(2));
  KV_CHECK(kv_dim == s.head_dim, Shape, "Expected head dim ", s.head_dim, " (from q) for ", kv_name, " but received ",
           kv_dim);
  KV_CHECK(kv_heads > 0 && s.num_q_heads > 0 && s.num_q_heads % kv_heads == 0, Shape, "Expected the ", kv_name,
           " heads to divide the ", s.num_q_heads, " query heads but received ", kv_heads);
  const bool dim_ok = q.device().is_cuda() ? (s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256)
                                           : s.head_dim > 0;
  KV_CHECK(dim_ok, Unsupported, "Expected head dim 64, 128 or 256 on a GPU but received ", s.head_dim);
  return s;
}

// One layer's page pool and a staged page table over it.
struct PagedInputs {
  Tensor k_pages, v_pages;
  std::shared_ptr<const StagedPageTable> table;
  PagedKV kv;
};

PagedInputs get_paged(const Napi::CallbackInfo& info, int first_arg, const Tensor& like, const char* like_name) {
  PagedInputs in;
  in.k_pages = get_tensor(info[first_arg], "kPages", 4);
  in.v_pages = get_tensor(info[first_arg + 1], "vPages", 4);
  check_same(in.k_pages, like, "kPages", like_name);
  check_same(in.v_pages, like, "vPages", like_name);
  KV_CHECK(in.v_pages.shape() == in.k_pages.shape(), Shape, "Expected vPages of shape ", shape_str(in.k_pages.shape()),
           " like kPages but received ", shape_str(in.v_pages.shape()));
  const int64_t page_size = in.k_pages.size(1);
  KV_CHECK(page_size >= 1 && page_size <= 256 && (page_size & (page_size - 1)) == 0, Range,
           "Expected a power of two from 1 to 256 for the page size (kPages.shape[1]) but received ", page_size);
  in.table = PageTableHandle::unwrap(info[first_arg + 2], "table");
  KV_CHECK(in.table->device == like.device(), Device, "Expected a page table staged on ", like.device().name(),
           " but received one staged on ", in.table->device.name());
  in.kv = in.table->bind(in.k_pages.data(), in.v_pages.data(), in.k_pages.size(0), page_size);
  return in;
}

// The ops that read whole sequences take a dense table, not a per-KV-head selection.
void check_dense(const StagedPageTable& table, const char* op) {
  KV_CHECK(table.rows_per_sequence == 1, Range, "Expected a dense page table (one row per sequence) for ", op,
           " but received a per-KV-head selection");
}

// prefill(q, k, v, cuSeqlensQ, cuSeqlensK, causal, windowLeft, scale, returnLse) -> [out, lse?]
Napi::Value prefill(const Napi::CallbackInfo& info) {
  const Tensor& q = get_tensor(info[0], "q", 3);
  const Tensor& k = get_tensor(info[1], "k", 3);
  const Tensor& v = get_tensor(info[2], "v", 3);
  check_float_input(q, "q");
  check_same(k, q, "k", "q");
  check_same(v, q, "v", "q");
  KV_CHECK(v.shape() == k.shape(), Shape, "Expected v of shape ", shape_str(k.shape()), " like k but received ",
           shape_str(v.shape()));
  PrefillParams p;
  p.dtype = q.dtype();
  p.shape = check_heads(q, k.size(1), k.size(2), "k");
  const HostInts cu_q = get_ints(info[3], "cuSeqlensQ");
  const HostInts cu_k = get_ints(info[4], "cuSeqlensK");
  p.batch = check_offsets(cu_q, q.size(0), "cuSeqlensQ", "q", &p.max_seqlen_q);
  KV_CHECK(cu_k.size == cu_q.size, Shape, "Expected ", cu_q.size, " entries for cuSeqlensK like cuSeqlensQ but received ",
           cu_k.size);
  check_offsets(cu_k, k.size(0), "cuSeqlensK", "k", &p.max_seqlen_k);
  p.mask = get_mask(info, 5);
  if (p.mask.causal) {
    for (int b = 0; b < p.batch; ++b) {
      const int sq = cu_q[b + 1] - cu_q[b], sk = cu_k[b + 1] - cu_k[b];
      KV_CHECK(sq <= sk, Range, "Expected no more queries than keys for causal sequence ", b, " but received ", sq,
               " queries and ", sk, " keys");
    }
  }
  const Device device = q.device();
  const QueryOutputs o = bind_queries(p, q, cu_q, get_bool(info[8], "returnLse"));
  const Tensor cu_k_dev = on_device(cu_k, device);
  p.total_k = static_cast<int>(k.size(0));
  p.k = k.data();
  p.v = v.data();
  p.cu_seqlens_k = cu_k_dev.data_as<int32_t>();
  p.cu_seqlens_k_host = cu_k.data;
  if (q.size(0) > 0) backend_for(device).prefill(device, p);
  return results(info.Env(), o.out, o.lse);
}

// pagedPrefill(q, kPages, vPages, table, cuSeqlensQ, causal, windowLeft, scale, returnLse) -> [out, lse?]
Napi::Value paged_prefill(const Napi::CallbackInfo& info) {
  const Tensor& q = get_tensor(info[0], "q", 3);
  check_float_input(q, "q");
  PagedInputs in = get_paged(info, 1, q, "q");
  check_dense(*in.table, "pagedPrefillAttention");
  PagedPrefillParams p;
  p.dtype = q.dtype();
  p.shape = check_heads(q, in.k_pages.size(2), in.k_pages.size(3), "kPages");
  p.mask = get_mask(info, 5);
  const HostInts cu_q = get_paged_queries(info[4], q, *in.table, in.kv.page_size, &p);
  const Device device = q.device();
  const QueryOutputs o = bind_queries(p, q, cu_q, get_bool(info[8], "returnLse"));
  p.kv = in.kv;
  if (q.size(0) > 0) backend_for(device).paged_prefill(device, p);
  return results(info.Env(), o.out, o.lse);
}

// pagedDecode(q, kPages, vPages, table, scale, returnLse, splits) -> [out, lse?]
Napi::Value paged_decode(const Napi::CallbackInfo& info) {
  const Tensor& q = get_tensor(info[0], "q", 3);
  check_float_input(q, "q");
  PagedInputs in = get_paged(info, 1, q, "q");
  DecodeParams p;
  p.dtype = q.dtype();
  p.shape = check_heads(q, in.k_pages.size(2), in.k_pages.size(3), "kPages");
  KV_CHECK(in.table->rows_per_sequence == 1 || in.table->rows_per_sequence == in.k_pages.size(2), Shape,
           "Expected a table with one row per sequence or per KV head (", in.k_pages.size(2), ") but received ",
           in.table->rows_per_sequence, " rows per sequence");
  p.scale = get_scale(info[4]);
  const QueryOutputs o = bind_decode_queries(p, q, *in.table, get_bool(info[5], "returnLse"));
  p.splits = static_cast<int>(get_int(info[6], "splits", 0, 256));
  p.kv = in.kv;
  backend_for(q.device()).paged_decode(q.device(), p);
  return results(info.Env(), o.out, o.lse);
}

// questDecode(q, kPages, vPages, table, meta, budgetPages, scale, returnLse, splits) -> [out, lse?]
Napi::Value quest_decode(const Napi::CallbackInfo& info) {
  const Tensor& q = get_tensor(info[0], "q", 3);
  check_float_input(q, "q");
  PagedInputs in = get_paged(info, 1, q, "q");
  check_dense(*in.table, "questDecodeAttention");
  const Tensor& meta = check_quest_meta(info[4], in.k_pages);
  QuestDecodeParams p;
  p.dtype = q.dtype();
  p.shape = check_heads(q, in.k_pages.size(2), in.k_pages.size(3), "kPages");
  p.budget = static_cast<int>(get_int(info[5], "budgetPages", 1, INT32_MAX));
  p.scale = get_scale(info[6]);
  const QueryOutputs o = bind_decode_queries(p, q, *in.table, get_bool(info[7], "returnLse"));
  p.splits = static_cast<int>(get_int(info[8], "splits", 0, 256));
  p.meta = meta.data();
  p.kv = in.kv;
  backend_for(q.device()).quest_decode(q.device(), p);
  return results(info.Env(), o.out, o.lse);
}

// attentionMass(q, kPages, table, lse, cuSeqlensQ, causal, scale, perPage) -> [f32 [rows, Hkv], rows]
// (rows: tokens of the table, or its page entries)
Napi::Value attention_mass(const Napi::CallbackInfo& info) {
  const Tensor& q = get_tensor(info[0], "q", 3);
  check_float_input(q, "q");
  const Tensor& k_pages = get_tensor(info[1], "kPages", 4);
  check_same(k_pages, q, "kPages", "q");
  auto table = PageTableHandle::unwrap(info[2], "table");
  KV_CHECK(table->device == q.device(), Device, "Expected a page table staged on ", q.device().name(),
           " but received one staged on ", table->device.name());
  KV_CHECK(table->rows_per_sequence == 1 && !table->indices.empty(), Range,
           "Expected a dense page table (one row per sequence) for attentionMass but received a per-KV-head selection");
  const int64_t page_size = k_pages.size(1);
  AttentionMassParams p;
  p.dtype = q.dtype();
  p.shape = check_heads(q, k_pages.size(2), k_pages.size(3), "kPages");
  p.kv = table->bind(k_pages.data(), k_pages.data(), k_pages.size(0), page_size);
  const Tensor& lse = get_tensor(info[3], "lse", 2);
  const Shape lse_shape = {q.size(0), q.size(1)};
  KV_CHECK(lse.dtype() == DType::F32 && lse.shape() == lse_shape && lse.device() == q.device(), Shape,
           "Expected lse of f32 ", shape_str(lse_shape), " on ", q.device().name(), " (from the attention call) but received ",
           lse.describe());
  const HostInts cu_q = get_ints(info[4], "cuSeqlensQ");
  KV_CHECK(cu_q.size == table->batch + 1, Shape, "Expected ", table->batch + 1,
           " entries (B+1, from the page table) for cuSeqlensQ but received ", cu_q.size);
  int max_q = 0;
  p.batch = check_offsets(cu_q, q.size(0), "cuSeqlensQ", "q", &max_q);
  p.causal = get_bool(info[5], "causal");
  p.scale = get_scale(info[6]);
  p.per_page = get_bool(info[7], "perPage");
  std::vector<int32_t> token_offsets(p.batch + 1, 0);
  for (int b = 0; b < p.batch; ++b) {
    const int32_t len = table->seq_len(b, static_cast<int>(page_size));
    KV_CHECK(!p.causal || cu_q[b + 1] - cu_q[b] <= len, Range, "Expected no more queries than keys for causal sequence ",
             b, " but received ", cu_q[b + 1] - cu_q[b], " queries and ", len, " keys");
    KV_CHECK(int64_t(token_offsets[b]) + len < INT32_MAX, Range, "Expected fewer than 2^31 tokens in the table");
    token_offsets[b + 1] = token_offsets[b] + len;
  }
  p.nnz = static_cast<int>(table->indices.size());
  const Device device = q.device();
  const int64_t rows = p.per_page ? p.nnz : token_offsets[p.batch];
  Tensor out = empty({rows, k_pages.size(2)}, DType::F32, device);
  const Tensor cu_q_dev = on_device(cu_q, device);
  const Tensor offsets_dev = PageTableHandle::upload(token_offsets, device);
  p.q = q.data();
  p.lse = lse.data_as<float>();
  p.cu_seqlens_q = cu_q_dev.data_as<int32_t>();
  p.cu_seqlens_q_host = cu_q.data;
  p.token_offsets = offsets_dev.data_as<int32_t>();
  p.token_offsets_host = token_offsets.data();
  p.out = out.data_as<float>();
  backend_for(device).attention_mass(device, p);
  Napi::Array result = Napi::Array::New(info.Env(), 2);
  result.Set(0u, TensorHandle::wrap(info.Env(), out));
  result.Set(1u, Napi::Number::New(info.Env(), static_cast<double>(rows)));
  return result;
}

// appendPagedKV(k, v, kPages, vPages, table, batchIndices, positions, questMeta?): with questMeta,
// the metadata of every page written to is recomputed after the write.
Napi::Value append_paged_kv(const Napi::CallbackInfo& info) {
  const Tensor& k = get_tensor(info[0], "k", 3);
  const Tensor& v = get_tensor(info[1], "v", 3);
  check_float_input(k, "k");
  check_same(v, k, "v", "k");
  KV_CHECK(v.shape() == k.shape(), Shape, "Expected v of shape ", shape_str(k.shape()), " like k but received ",
           shape_str(v.shape()));
  PagedInputs in = get_paged(info, 2, k, "k");
  KV_CHECK(in.table->rows_per_sequence == 1, Range,
           "Expected a dense page table (one row per sequence) for appendPagedKV but received a per-KV-head selection");
  const Shape token_shape = {in.k_pages.size(2), in.k_pages.size(3)};
  KV_CHECK(k.size(1) == token_shape[0] && k.size(2) == token_shape[1], Shape, "Expected k of shape [N, ", token_shape[0],
           ", ", token_shape[1], "] to match kPages but received ", shape_str(k.shape()));
  const HostInts batch_indices = get_ints(info[5], "batchIndices");
  const HostInts positions = get_ints(info[6], "positions");
  const int64_t n = k.size(0);
  KV_CHECK(batch_indices.size == n && positions.size == n, Shape, "Expected ", n,
           " entries (one per row of k) for batchIndices and positions but received ", batch_indices.size, " and ",
           positions.size);
  for (int64_t t = 0; t < n; ++t) {
    const int32_t b = batch_indices[t];
    KV_CHECK(b >= 0 && b < in.table->batch, Range, "Expected batchIndices[", t, "] in [0, ", in.table->batch,
             ") but received ", b);
    const int32_t len = in.table->seq_len(b, in.kv.page_size);
    KV_CHECK(positions[t] >= 0 && positions[t] < len, Range, "Expected positions[", t, "] in [0, ", len,
             ") (the length of sequence ", b, " in the page table) but received ", positions[t]);
  }
  AppendParams p;
  p.dtype = k.dtype();
  p.shape = {static_cast<int>(k.size(1)), static_cast<int>(k.size(1)), static_cast<int>(k.size(2))};
  p.num_tokens = static_cast<int>(n);
  p.k = k.data();
  p.v = v.data();
  p.k_pages = in.k_pages.data();
  p.v_pages = in.v_pages.data();
  p.kv = in.kv;
  const Device device = k.device();
  const Tensor batch_dev = on_device(batch_indices, device), positions_dev = on_device(positions, device);
  p.batch_indices = batch_dev.data_as<int32_t>();
  p.positions = positions_dev.data_as<int32_t>();
  if (n > 0) backend_for(device).append_paged_kv(device, p);
  if (!info[7].IsUndefined()) {
    const Tensor& meta = check_quest_meta(info[7], in.k_pages);
    std::vector<int32_t> pages, valid_len;
    std::vector<bool> seen(in.table->indptr.back(), false);
    for (int64_t t = 0; t < n; ++t) {
      const int b = batch_indices[t];
      const int32_t entry = in.table->indptr[b] + positions[t] / in.kv.page_size;
      if (seen[entry]) continue;
      seen[entry] = true;
      pages.push_back(in.table->indices[entry]);
      valid_len.push_back(entry + 1 < in.table->indptr[b + 1] ? in.kv.page_size : in.table->last_page_len[b]);
    }
    update_quest_meta(in.k_pages, meta, std::move(pages), std::move(valid_len));
  }
  return info.Env().Undefined();
}

}  // namespace

float get_scale(const Napi::Value& v) {
  const float scale = static_cast<float>(get_number(v, "scale"));
  KV_CHECK(std::isfinite(scale) && scale > 0, Range, "Expected a positive finite number for scale but received ", scale);
  return scale;
}

AttentionMask get_mask(const Napi::CallbackInfo& info, int first_arg) {
  AttentionMask m;
  m.causal = get_bool(info[first_arg], "causal");
  m.window_left = static_cast<int>(get_int(info[first_arg + 1], "windowLeft", -1, INT32_MAX));
  m.scale = get_scale(info[first_arg + 2]);
  return m;
}

HostInts get_paged_queries(const Napi::Value& v, const Tensor& q, const StagedPageTable& table, int page_size,
                           PagedPrefillParams* p) {
  const HostInts cu_q = get_ints(v, "cuSeqlensQ");
  KV_CHECK(cu_q.size == table.batch + 1, Shape, "Expected ", table.batch + 1,
           " entries (B+1, from the page table) for cuSeqlensQ but received ", cu_q.size);
  p->batch = check_offsets(cu_q, q.size(0), "cuSeqlensQ", "q", &p->max_seqlen_q);
  for (int b = 0; b < p->batch; ++b) {
    const int sq = cu_q[b + 1] - cu_q[b];
    const int sk = table.seq_len(b, page_size);
    KV_CHECK(!p->mask.causal || sq <= sk, Range, "Expected no more queries than keys for causal sequence ", b,
             " but received ", sq, " queries and ", sk, " keys");
    p->max_seqlen_k = std::max(p->max_seqlen_k, sk);
  }
  return cu_q;
}

Tensor lse_tensor(bool wanted, int64_t rows, int heads, const Device& device) {
  return wanted ? empty({rows, heads}, DType::F32, device) : Tensor();
}

Napi::Value results(Napi::Env env, const Tensor& out, const Tensor& lse) {
  Napi::Array r = Napi::Array::New(env, 2);
  r.Set(0u, TensorHandle::wrap(env, out));
  r.Set(1u, lse.defined() ? Napi::Value(TensorHandle::wrap(env, lse)) : env.Undefined());
  return r;
}

void export_attention_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("prefill", Napi::Function::New<guarded<prefill>>(env, "prefill"));
  exports.Set("pagedPrefill", Napi::Function::New<guarded<paged_prefill>>(env, "pagedPrefill"));
  exports.Set("pagedDecode", Napi::Function::New<guarded<paged_decode>>(env, "pagedDecode"));
  exports.Set("questDecode", Napi::Function::New<guarded<quest_decode>>(env, "questDecode"));
  exports.Set("attentionMass", Napi::Function::New<guarded<attention_mass>>(env, "attentionMass"));
  exports.Set("appendPagedKV", Napi::Function::New<guarded<append_paged_kv>>(env, "appendPagedKV"));
}

}  // namespace kvflash::binding
